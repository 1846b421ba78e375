#!/usr/bin/env bash
# Debian packages sinkdlm needs beyond Python: a compiler toolchain for the extension, GoogleTest
# for tests/cpp, the English text the demo trains on (sinkdlm.data), and, for a Debian python3,
# its headers and pip. Installs only what is missing, so a second run costs nothing. Exits
# non-zero when something is missing and cannot be installed (no apt-get, no root and no sudo,
# or apt-get failing): a setup or CI run must not go on without its tools. Elsewhere than
# Debian/Ubuntu, install the equivalents yourself and set SINKDLM_SKIP_SYSTEM_DEPS=1.
set -euo pipefail
[ "${SINKDLM_SKIP_SYSTEM_DEPS:-0}" = 1 ] && exit 0
PY=${PYTHON:-python3}
PACKAGES=(g++ cmake ninja-build libgtest-dev fortunes jargon-text)
# Debian's own python3 (a venv made from it included) ships its headers and pip separately.
if [ "$($PY -c 'import sys; print(sys.base_prefix)' 2>/dev/null)" = /usr ]; then
  PACKAGES+=(python3-dev)
  $PY -m pip --version >/dev/null 2>&1 || PACKAGES+=(python3-pip)
fi
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed' || missing+=("$p")
done
[ ${#missing[@]} = 0 ] && exit 0
fail() {
  echo "sinkdlm: missing system packages: ${missing[*]}" >&2
  echo "sinkdlm: $1" >&2
  exit 1
}
command -v apt-get >/dev/null ||
  fail "no apt-get here: install their equivalents, then rerun with SINKDLM_SKIP_SYSTEM_DEPS=1"
SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || fail "not root and no sudo: install them as root"
  SUDO="sudo"
fi
echo "sinkdlm: apt-get install ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq || fail "apt-get update failed"
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
  fail "apt-get install failed"
