"""What the operators share: which devices have a native kernel (the dispatcher says), the
default score scale, the accumulation dtype and the broadcast of a sink's key or value."""

from __future__ import annotations

import torch

_NATIVE_KERNELS: dict[tuple[str, str], bool] = {}


@torch.compiler.assume_constant_result
def has_native_kernel(op: str, device_type: str) -> bool:
    """True if the dispatcher holds a kernel of ``op`` (``"sinkdlm::remask_step"``) registered
    for ``device_type``'s dispatch key ("cpu" -> CPU, "cuda" -> CUDA, "meta" -> Meta, ...).

    csrc/ registers the CPU and CUDA kernels (CUDA only in a build linked against a CUDA torch),
    ``torch.library.register_fake`` the Meta one. Each op runs its native kernel where this is
    True and its PyTorch composite elsewhere. The lookup costs microseconds, so each (op, device
    type) is asked once; torch.compile takes the answer as a constant.
    """
    key = (op, device_type)
    found = _NATIVE_KERNELS.get(key)
    if found is None:
        dispatch_key = torch._C._dispatch_key_for_device(device_type)
        found = torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key)
        _NATIVE_KERNELS[key] = found
    return found


def softmax_scale(scale: float | None, head_dim: int) -> float:
    """The score scale: ``scale`` when given, else ``head_dim ** -0.5`` (SDPA's default)."""
    return float(scale) if scale is not None else head_dim**-0.5


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ops accumulate in and return statistics (lse, attention mass) in: float64
    for float64 inputs, float32 for every other float dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def expand_sink(sink: torch.Tensor, batch: int) -> torch.Tensor:
    """A sink's key or value, ``(Hkv, D)`` (one for the batch) or ``(B, Hkv, D)``, as
    ``(B, Hkv, D)`` (a view: no copy)."""
    return sink.expand(batch, *sink.shape[-2:]) if sink.dim() == 2 else sink
