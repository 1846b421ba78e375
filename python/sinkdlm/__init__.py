"""sinkdlm: sink-token attention for diffusion language models."""

import torch  # noqa: F401  (loads torch's libraries before any extension)

from . import train  # noqa: F401  (sinkdlm.train.masked_diffusion_loss)
from .sink_attention import sink_attention, sink_attention_mask, sink_attention_reference

__all__ = ["sink_attention", "sink_attention_mask", "sink_attention_reference"]
