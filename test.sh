#!/usr/bin/env bash
# The test command: installs what the test suite drives (nginx, Debian's
# chromium, Node.js/npm and the browser tests' npm packages) when missing,
# then runs `cargo test`. Extra arguments go to `cargo test`.
# The tests start their own servers (the service, nginx, redis-server,
# headless chromium) on free ports with temp data dirs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

# "path-or-command:debian-package", installed with apt-get when missing.
required=(
  "cc:gcc"
  "/usr/sbin/nginx:nginx"
  "/usr/bin/chromium:chromium"
  "node:nodejs"
  "npm:npm"
  "redis-server:redis-server"
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

# npm packages of the browser tests (playwright-core, partysocket, ws), from
# the lock file. No browser is downloaded: the tests use Debian's chromium.
if [ ! -d tests/browser/node_modules ] || [ tests/browser/package-lock.json -nt tests/browser/node_modules ]; then
  echo "==> npm ci (tests/browser)"
  (cd tests/browser && npm ci --no-audit --no-fund)
fi

# redis-server is installed above, so the cluster tests must run (not skip).
export LINK_COUNTER_REQUIRE_REDIS=1

echo "==> cargo test $*"
exec cargo test "$@"
