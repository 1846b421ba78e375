#!/usr/bin/env bash
# Debian packages sinkdlm needs beyond Python: a compiler toolchain for the extension, GoogleTest
# for tests/cpp, and the English text the demo trains on (sinkdlm.data). Installs only what is
# missing, so a second run costs nothing; elsewhere than Debian/Ubuntu it prints what to install.
set -euo pipefail
PACKAGES=(g++ cmake ninja-build libgtest-dev fortunes jargon-text)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} = 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "sinkdlm: please install the equivalents of: ${missing[*]}" >&2
  exit 0
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
echo "sinkdlm: apt-get install ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
