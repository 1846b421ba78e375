"""sinkdlm: sink-token attention and remasking kernels for diffusion language models."""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  (registers torch.ops.sinkdlm.*)
from .generate import dream_transfer_schedule, generate, llada_transfer_schedule  # noqa: F401
from .remask_step import remask_step, remask_step_noise, remask_step_reference, remask_step_seed  # noqa: F401
