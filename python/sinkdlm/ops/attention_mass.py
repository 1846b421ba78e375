"""Attention mass per key, Ā_j = (1/S) Σ_i A_ij, from the forward's log-sum-exp.

A_ij = exp(scale * q_i·k_j - lse_i), so with the lse the forward returned (sink_attention(...,
return_lse=True)) one more pass over the keys gives every column mean without the L×L matrix.
Native CPU and CUDA kernels (csrc/analysis, cuda/attention_mass.cu); devices without one use a
query-chunked PyTorch loop with the same semantics.
"""

from __future__ import annotations

import torch

from .checks import check_attention_mass_args
from .common import accumulation_dtype, expand_sink, has_native_kernel, softmax_scale

__all__ = ["attention_mass"]

_OP = "sinkdlm::attention_mass"
_QUERY_CHUNK = 256


def attention_mass(q, k, lse, sink_k=None, *, sink_logit=None, key_padding_mask=None, scale=None):
    """Mass each key receives from the real query rows, averaged over those rows.

    Args:
        q: (B,H,L,D) queries as the attention saw them (after RoPE); any float dtype, any strides.
        k: (B,Hkv,L,D) keys, H % Hkv == 0.
        lse: (B,H,L) the forward's log-sum-exp per query row over every key including the sink.
        sink_k: optional (Hkv,D) or (B,Hkv,D) key of a sink token.
        sink_logit: optional (H,) logit sink (gpt-oss form, logit units).
        key_padding_mask: optional bool (B,L), True = real token.
        scale: softmax scale (default ``D ** -0.5``, as for sink_attention).

    Returns:
        mass (B,H,L) and sink_mass (B,H): float32 (float64 for float64 q). mass[b,h,j] =
        (1/S_b) Σ_{real i} softmax_i(j); padded keys get 0; sink_mass is the same for the sink
        (key sink plus logit sink). Rows of a softmax sum to 1, so mass.sum(-1) + sink_mass = 1
        for a sequence with real tokens.
    """
    check_attention_mass_args(q, k, lse, sink_k, sink_logit, key_padding_mask, scale)
    dtype = accumulation_dtype(q.dtype)
    scale = softmax_scale(scale, q.shape[-1])
    native = has_native_kernel(_OP, q.device.type)
    # bfloat16 q and k reach the CPU kernel as they are: its score GEMMs then run bfloat16 x
    # bfloat16 -> float32 (the BLAS's, on AMX tiles where the CPU has them).
    keep = native and q.device.type == "cpu" and q.dtype == k.dtype == torch.bfloat16
    args = [
        q if keep else q.to(dtype),
        k if keep else k.to(dtype),
        lse.to(dtype),
        None if sink_k is None else sink_k.to(dtype),
        None if sink_logit is None else sink_logit.to(dtype),
        key_padding_mask,
    ]
    if native:
        return torch.ops.sinkdlm.attention_mass(*args, scale)
    return _attention_mass_chunked(*args, scale)


def _attention_mass_chunked(q, k, lse, sink_k, sink_logit, key_padding_mask, scale):
    # Query chunks of _QUERY_CHUNK rows: O(chunk * L) memory, the same result as the kernels.
    b, h, n, _ = q.shape
    group = h // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    real = (
        torch.ones(b, n, dtype=torch.bool, device=q.device)
        if key_padding_mask is None
        else key_padding_mask
    )
    mass = q.new_zeros(b, h, n)
    sink_mass = q.new_zeros(b, h)
    sk = None if sink_k is None else expand_sink(sink_k, b).repeat_interleave(group, 1)
    for i0 in range(0, n, _QUERY_CHUNK):
        qc, lc = q[:, :, i0 : i0 + _QUERY_CHUNK], lse[:, :, i0 : i0 + _QUERY_CHUNK, None]
        row = real[:, None, i0 : i0 + _QUERY_CHUNK, None].to(q.dtype)
        probs = torch.exp(torch.einsum("bhid,bhjd->bhij", qc, k) * scale - lc) * row
        mass += probs.sum(2)
        if sk is not None:
            sink_mass += (
                torch.exp(torch.einsum("bhid,bhd->bhi", qc, sk)[..., None] * scale - lc) * row
            ).sum((2, 3))
        if sink_logit is not None:
            sink_mass += (torch.exp(sink_logit[None, :, None, None] - lc) * row).sum((2, 3))
    count = real.sum(1).to(q.dtype)[:, None]
    inv = torch.where(count > 0, 1.0 / count.clamp_min(1), torch.zeros_like(count))
    return mass * inv[..., None] * real[:, None, :], sink_mass * inv


@torch.library.register_fake(_OP)
def _attention_mass_fake(q, k, lse, sink_k, sink_logit, key_padding_mask, scale):
    b, h, n, _ = q.shape
    return lse.new_empty(b, h, n), lse.new_empty(b, h)  # lse's dtype: float32 for bfloat16 q


def _attention_mass_backward(ctx, *grads):
    raise NotImplementedError(
        "attention_mass is not differentiable (an analysis of a forward's attention): detach "
        "q, k, lse and the sinks, or call it under torch.no_grad()"
    )


# Without an autograd kernel, PyTorch would backpropagate zeros with only a warning.
torch.library.register_autograd(_OP, _attention_mass_backward)
