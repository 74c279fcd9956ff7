#!/usr/bin/env bash
# Makes the Docker Hub images that deploy/container/Containerfile and
# deploy/compose/compose.yaml name, when podman does not have them, from Debian's
# own packages: this machine reaches Debian's mirror but no container registry.
#   docker.io/library/debian:bookworm-slim  debootstrap --variant=minbase, trimmed like
#                                           the official slim image (no docs, man pages,
#                                           locales, apt lists)
#   docker.io/library/redis:7               Debian 12's redis-server (7.0), run as the
#                                           official image runs it
#   docker.io/library/nginx:stable          Debian 12's nginx-light with only conf.d/ as
#                                           the official image has it
# An image already there (a real one pulled elsewhere) is left alone. Each stand-in
# carries the label link-counter.stand-in=true.
set -euo pipefail

have() { podman image exists "$1"; }

if ! have docker.io/library/debian:bookworm-slim; then
  rootfs="$(mktemp -d)"
  trap 'rm -rf "$rootfs"' EXIT
  debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >/dev/null
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
  find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
  tar -C "$rootfs" -c . | podman import --change 'CMD ["bash"]' \
    --change 'LABEL link-counter.stand-in=true' - docker.io/library/debian:bookworm-slim >/dev/null
fi

build() { # build TAG CONTAINERFILE-TEXT
  local dir
  dir="$(mktemp -d)"
  printf '%s\n' "$2" > "$dir/Containerfile"
  # The host's network: apt inside the build reaches Debian's mirror as the host does.
  podman build --quiet --network host --label link-counter.stand-in=true \
    -t "$1" -f "$dir/Containerfile" "$dir" >/dev/null
  rm -rf "$dir"
}

if ! have docker.io/library/redis:7; then
  build docker.io/library/redis:7 'FROM docker.io/library/debian:bookworm-slim
RUN apt-get update -q && apt-get install -y -q --no-install-recommends redis-server >/dev/null \
 && rm -rf /var/lib/apt/lists/*
EXPOSE 6379
USER redis
CMD ["redis-server", "--protected-mode", "no", "--bind", "0.0.0.0 ::", "--dir", "/var/lib/redis"]'
fi

if ! have docker.io/library/nginx:stable; then
  build docker.io/library/nginx:stable 'FROM docker.io/library/debian:bookworm-slim
RUN apt-get update -q && apt-get install -y -q --no-install-recommends nginx-light >/dev/null \
 && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/* \
 && ln -sf /dev/stdout /var/log/nginx/access.log && ln -sf /dev/stderr /var/log/nginx/error.log
EXPOSE 80
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]'
fi
