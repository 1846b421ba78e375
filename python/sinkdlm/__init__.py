"""sinkdlm: sink-token attention and remasking kernels for diffusion language models."""

import torch  # noqa: F401  (loads libtorch before the extension that links against it)

from . import _C  # noqa: F401  (registers torch.ops.sinkdlm.*)
from .generate import dream_transfer_schedule, generate, llada_transfer_schedule
from .ops import (
    remask_step,
    remask_step_noise,
    remask_step_reference,
    remask_step_seed,
    sink_attention,
    sink_attention_mask,
    sink_attention_reference,
)
from .train import masked_diffusion_loss

__all__ = [
    "dream_transfer_schedule",
    "generate",
    "llada_transfer_schedule",
    "masked_diffusion_loss",
    "remask_step",
    "remask_step_noise",
    "remask_step_reference",
    "remask_step_seed",
    "sink_attention",
    "sink_attention_mask",
    "sink_attention_reference",
]
__version__ = "0.1.0"
