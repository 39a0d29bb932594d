#!/usr/bin/env bash
# The test command: installs what the tests need beyond Rust and then runs `cargo test`
# (arguments go to cargo test, e.g. `scripts/test.sh --test it openai`).
#
# - redis-server: tests start their own servers (never the machine's shared one).
# - Debian's chromium and chromium-driver: the playground's browser tests (tests/it/browser.rs).
# - The official OpenAI and Anthropic SDKs, pinned in tests/sdk/requirements.txt, in a
#   virtual environment at target/sdk-venv (made again when the pins change).
set -euo pipefail
cd "$(dirname "$0")/.."

apt_install() {
  if [ "$(id -u)" != 0 ]; then
    echo "missing: $* (install it with: sudo apt-get install $*)" >&2
    exit 1
  fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

command -v redis-server >/dev/null || apt_install redis-server
command -v python3 >/dev/null || apt_install python3 python3-venv
[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] || apt_install chromium chromium-driver

VENV=target/sdk-venv
STAMP="$VENV/.requirements"
if [ ! -x "$VENV/bin/python" ] || ! cmp -s tests/sdk/requirements.txt "$STAMP"; then
  echo "creating the SDKs' virtual environment in $VENV" >&2
  rm -rf "$VENV"
  mkdir -p target
  python3 -m venv "$VENV" 2>/dev/null || { apt_install python3-venv && python3 -m venv "$VENV"; }
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r tests/sdk/requirements.txt
  cp tests/sdk/requirements.txt "$STAMP"
fi

exec cargo test "$@"
