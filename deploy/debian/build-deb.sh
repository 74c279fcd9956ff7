#!/usr/bin/env bash
# Builds the Debian package link-counter_VERSION_ARCH.deb from a release binary:
#
#   cargo build --release
#   deploy/debian/build-deb.sh target/release/link-counter target/debian
#   sudo apt install ./target/debian/link-counter_*.deb
#   sudo systemctl enable --now link-counter
#
# The package: /usr/bin/link-counter, the systemd unit of deploy/systemd/ (ExecStart in
# /usr/bin), /etc/link-counter/config.toml from deploy/config.example.toml (a conffile),
# the `link-counter` system user and its data directory /var/lib/link-counter, which a
# purge keeps. Needs dpkg-deb and objdump (binutils). Prints the package's path.
set -euo pipefail

binary="${1:?usage: build-deb.sh BINARY OUTDIR}"
outdir="${2:?usage: build-deb.sh BINARY OUTDIR}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
here="$repo/deploy/debian"

version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/Cargo.toml" | head -n 1)"
arch="$(dpkg --print-architecture)"
# The newest glibc symbol version the binary needs is the libc6 it depends on.
glibc="$(objdump -T "$binary" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -n 1)"

root="$(mktemp -d)"
chmod 0755 "$root"
trap 'rm -rf "$root"' EXIT
install -D -m 0755 "$binary" "$root/usr/bin/link-counter"
strip --strip-debug "$root/usr/bin/link-counter"
# The shipped unit, with the packaged binary's path and without its manual-install header.
install -d "$root/lib/systemd/system"
{
  echo "# /lib/systemd/system/link-counter.service, from the link-counter package."
  echo "# Secrets (admin.token) go in /etc/link-counter/environment (root:root, mode 0600):"
  echo "#   LINK_COUNTER__ADMIN__TOKEN=..."
  echo "# Local changes: systemctl edit link-counter"
  sed -n '/^\[Unit\]/,$p' "$repo/deploy/systemd/link-counter.service" \
    | sed 's|^ExecStart=/usr/local/bin/link-counter |ExecStart=/usr/bin/link-counter |'
} > "$root/lib/systemd/system/link-counter.service"
chmod 0644 "$root/lib/systemd/system/link-counter.service"
install -D -m 0644 "$repo/deploy/config.example.toml" "$root/etc/link-counter/config.toml"
install -D -m 0644 "$here/copyright" "$root/usr/share/doc/link-counter/copyright"

install -d "$root/DEBIAN"
for script in postinst prerm postrm; do
  install -m 0755 "$here/$script" "$root/DEBIAN/$script"
done
echo /etc/link-counter/config.toml > "$root/DEBIAN/conffiles"
cat > "$root/DEBIAN/control" <<CONTROL
Package: link-counter
Version: $version
Architecture: $arch
Maintainer: link-counter developers <link-counter@localhost>
Installed-Size: $(du -sk --exclude=DEBIAN "$root" | cut -f1)
Depends: libc6 (>= $glibc), libgcc-s1, adduser
Section: net
Priority: optional
Description: self-hosted real-time presence counts for links
 link-counter puts an "N viewing" number next to each link on a page: how many
 people have the linked page open right now. A Rust rebuild of the PartyKit
 link-counter example (PartySocket clients work unchanged), with an embedded
 database and an optional Redis cluster mode.
CONTROL

mkdir -p "$outdir"
deb="$outdir/link-counter_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zgzip --build "$root" "$deb" >/dev/null
echo "$deb"
