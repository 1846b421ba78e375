#!/usr/bin/env bash
# The Hugging Face tests again under transformers 4.57 (the last 4.x line, the one with both
# AttentionInterface and AttentionMaskInterface; dLLM pins 4.57.x, 4.57.0 is yanked), in a venv
# that installs only transformers (and the hub/tokenizers versions it needs) from PyPI and takes
# torch, sinkdlm and the rest from the environment scripts/setup.sh installed into.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VERSION=${SINKDLM_TRANSFORMERS4:-4.57.1}
VENV=${SINKDLM_TRANSFORMERS4_VENV:-build/venv-transformers4}
purelib() { "$1" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"; }
"$PY" -m venv --system-site-packages "$VENV"
# The current environment (possibly itself a venv) behind the new venv's own packages.
echo "import site; site.addsitedir('$(purelib "$PY")')" >"$(purelib "$VENV/bin/python")/zz_sinkdlm_env.pth"
"$VENV/bin/python" -m pip install -q "transformers==$VERSION"
"$VENV/bin/python" -c "import transformers, sinkdlm._C; assert transformers.__version__ == '$VERSION', transformers.__version__; print('transformers', transformers.__version__)"
exec "$VENV/bin/python" -m pytest -q tests/test_hf_adapters.py tests/test_hf_patch.py tests/test_hf_patch_ddp.py \
  tests/test_hf_sink_in_layer.py "$@"
