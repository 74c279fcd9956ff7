#!/usr/bin/env bash
# The test command: installs what the test suite drives (nginx, openssl,
# Debian's chromium, Node.js/npm and the browser tests' npm packages, and for
# the install tests podman, debootstrap, podman-compose and kubernetes-validate)
# when missing, then runs `cargo test`. Extra arguments go to `cargo test`.
# The tests start their own servers (the service, nginx, redis-server,
# headless chromium) on free ports with temp data dirs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

# "path-or-command:debian-package", installed with apt-get when missing.
required=(
  "cc:gcc"
  "/usr/sbin/nginx:nginx"
  "openssl:openssl"
  "/usr/bin/chromium:chromium"
  "node:nodejs"
  "npm:npm"
  "redis-server:redis-server"
  # The install tests (tests/install): containers, a Debian base image, the .deb.
  "podman:podman"
  "runc:runc"
  "/usr/lib/podman/netavark:netavark"
  "/usr/lib/podman/aardvark-dns:aardvark-dns"
  # netavark sets up container networks with iptables (not a dependency of
  # Debian's netavark package; without it every `RUN` step fails).
  "iptables:iptables"
  "debootstrap:debootstrap"
  "objdump:binutils"
)
missing=()
for pair in "${required[@]}"; do
  tool="${pair%%:*}"
  if [[ "$tool" == /* ]]; then
    [ -x "$tool" ] || missing+=("${pair#*:}")
  else
    command -v "$tool" >/dev/null 2>&1 || missing+=("${pair#*:}")
  fi
done
if ((${#missing[@]})); then
  echo "==> installing: ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi

# The install tests' PyPI tools: podman-compose 1.6 (Debian's 1.0.3 mishandles
# host networking and exits 0 when a service fails) and kubernetes-validate (the
# Kubernetes schemas, offline).
if ! command -v podman-compose >/dev/null 2>&1 || ! command -v kubernetes-validate >/dev/null 2>&1; then
  echo "==> pip install podman-compose kubernetes-validate"
  python3 -m pip install --quiet --disable-pip-version-check 'podman-compose>=1.6,<2' 'kubernetes-validate>=1.31'
fi

# The browser tests' playwright-core needs Node.js 20 or newer; Debian 12's
# own nodejs package is 18.
node_version="$(node -p process.versions.node)"
if ((${node_version%%.*} < 20)); then
  cat >&2 <<EOF
error: Node.js $node_version is too old: the browser tests (playwright-core) need Node.js 20 or newer.
  Debian 13 (trixie) ships Node.js 20 as its nodejs package.
  Elsewhere (Debian 12 bookworm, Ubuntu 24.04), install it from NodeSource (https://github.com/nodesource/distributions):
    curl -fsSL https://deb.nodesource.com/setup_22.x -o nodesource_setup.sh
    sudo bash nodesource_setup.sh && sudo apt-get install -y nodejs
  (NodeSource's nodejs includes npm.) Then run ./test.sh again.
EOF
  exit 1
fi

# npm packages of the browser tests (playwright-core, partysocket, ws), from
# the lock file. No browser is downloaded: the tests use Debian's chromium.
if [ ! -d tests/browser/node_modules ] || [ tests/browser/package-lock.json -nt tests/browser/node_modules ]; then
  echo "==> npm ci (tests/browser)"
  (cd tests/browser && npm ci --no-audit --no-fund)
fi

# redis-server is installed above, so the cluster tests must run (not skip).
export LINK_COUNTER_REQUIRE_REDIS=1

# Every target runs even when one fails (--no-fail-fast); the output is
# kept so that the run ends with the list of failed tests and one total line.
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
echo "==> cargo test --no-fail-fast $*"
status=0
cargo test --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?

# "test result: ok. 12 passed; 1 failed; ..." per target, summed; failed
# tests named with their target ("Running tests/api/main.rs (...)").
awk '
  /^ *Running / { target = $2 }
  /^ *Doc-tests / { target = "doc-tests " $2 }
  /^test .* \.\.\. FAILED$/ { failed[++nf] = target ": " $2 }
  /^test result: / {
    for (i = 1; i <= NF; i++) {
      if ($(i) ~ /^(passed|failed);?$/) { n = $(i - 1); sub(/;$/, "", $(i)); sum[$(i)] += n }
    }
  }
  /^ +`--(test|lib|bin|bench|doc)/ { broken[++nb] = "target failed: " $1 " " $2 }
  END {
    if (nf || nb) {
      print ""
      print "failed tests:"
      for (i = 1; i <= nf; i++) print "  " failed[i]
      for (i = 1; i <= nb; i++) print "  " broken[i]
    }
    printf "total: %d passed, %d failed\n", sum["passed"], sum["failed"]
  }
' "$log"
exit "$status"
