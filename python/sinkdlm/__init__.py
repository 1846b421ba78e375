"""sinkdlm: sink-token attention and tools for diffusion language models."""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  (registers torch.ops.sinkdlm.*)
from .sink_attention import sink_attention  # noqa: F401
