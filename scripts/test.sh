#!/usr/bin/env bash
# The whole test suite: pytest, which also builds and runs the GoogleTest suite via ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m pytest -q tests "$@"
