"""Attention mass per key, Ā_j = (1/S) Σ_i A_ij, from the forward's log-sum-exp.

A_ij = exp(scale * q_i·k_j - lse_i), so with the lse the forward returned (sink_attention(...,
return_lse=True)) one more pass over the keys gives every column mean without the L×L matrix.
Native CPU and CUDA kernels (csrc/analysis, cuda/attention_mass.cu); devices without one use a
query-chunked PyTorch loop with the same semantics.
"""

from __future__ import annotations

import torch

from .. import _checks
from ..sink_attention import softmax_scale

_OP = "sinkdlm::attention_mass"
_QUERY_CHUNK = 256


# Device types with a native kernel in this build (looked up once: torch.compile traces a set).
_NATIVE_DEVICE_TYPES = frozenset(
    dev
    for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))
    if torch._C._dispatch_has_kernel_for_dispatch_key(_OP, key)
)


def _check(q, k, lse, sink_k, sink_logit, key_padding_mask, scale):
    def fail(name, expected, got, exc=ValueError):
        _checks.fail("attention_mass", name, expected, got, exc)

    tensors = (("q", q), ("k", k), ("lse", lse), ("sink_k", sink_k), ("sink_logit", sink_logit))
    for name, t in tensors:
        if t is not None and not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            fail(name, "a floating-point tensor", _checks.describe(t), TypeError)
    if q.dim() != 4:
        fail("q", "(B,H,L,D)", f"shape {tuple(q.shape)}")
    b, h, n, d = q.shape
    if k.dim() != 4 or k.shape[0] != b or k.shape[2:] != (n, d) or not k.shape[1] or h % k.shape[1]:
        fail("k", f"(B,Hkv,L,D) with Hkv >= 1 dividing H for q {tuple(q.shape)}", tuple(k.shape))
    if lse.shape != (b, h, n):
        fail("lse", f"(B,H,L) = {(b, h, n)}", tuple(lse.shape))
    if sink_k is not None and sink_k.shape not in ((k.shape[1], d), (b, k.shape[1], d)):
        fail("sink_k", f"(Hkv,D) or (B,Hkv,D) = {(k.shape[1], d)} or {(b, k.shape[1], d)}",
             tuple(sink_k.shape))  # fmt: skip
    if sink_logit is not None and sink_logit.shape != (h,):
        fail("sink_logit", f"(H,) = ({h},)", tuple(sink_logit.shape))
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            fail("key_padding_mask", "a bool tensor", _checks.describe(key_padding_mask), TypeError)
        if key_padding_mask.shape != (b, n):
            fail("key_padding_mask", f"(B,L) = {(b, n)}", tuple(key_padding_mask.shape))
    _checks.softmax_scale("attention_mass", scale, q.dtype)
    for name, t in (*tensors[1:], ("key_padding_mask", key_padding_mask)):
        if t is not None and t.device != q.device:
            fail(name, f"on q's device {q.device}", t.device)


def attention_mass(q, k, lse, sink_k=None, *, sink_logit=None, key_padding_mask=None, scale=None):
    """Mass each key receives from the real query rows, averaged over those rows.

    Args:
        q: (B,H,L,D) queries as the attention saw them (after RoPE); any float dtype, any strides.
        k: (B,Hkv,L,D) keys, H % Hkv == 0.
        lse: (B,H,L) the forward's log-sum-exp per query row over every key including the sink.
        sink_k: optional (Hkv,D) or (B,Hkv,D) key of a sink token.
        sink_logit: optional (H,) logit sink (gpt-oss form, logit units).
        key_padding_mask: optional bool (B,L), True = real token.
        scale: softmax scale (default 1/sqrt(D)).

    Returns:
        mass (B,H,L) and sink_mass (B,H): float32 (float64 for float64 q). mass[b,h,j] =
        (1/S_b) Σ_{real i} softmax_i(j); padded keys get 0; sink_mass is the same for the sink
        (key sink plus logit sink). Rows of a softmax sum to 1, so mass.sum(-1) + sink_mass = 1
        for a sequence with real tokens.
    """
    _check(q, k, lse, sink_k, sink_logit, key_padding_mask, scale)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = softmax_scale(scale, q.shape[-1])
    args = [
        q.to(dtype),
        k.to(dtype),
        lse.to(dtype),
        None if sink_k is None else sink_k.to(dtype),
        None if sink_logit is None else sink_logit.to(dtype),
        key_padding_mask,
    ]
    if q.device.type in _NATIVE_DEVICE_TYPES:
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
    sk = None
    if sink_k is not None:
        sk = (sink_k if sink_k.dim() == 3 else sink_k.expand(b, -1, -1)).repeat_interleave(group, 1)
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
    return q.new_empty(b, h, n), q.new_empty(b, h)


def attention_mass_reference(
    q, k, sink_k=None, *, sink_logit=None, key_padding_mask=None, scale=None
):
    """Dense float64 reference: the full softmax matrix over [keys ; sink], then column means.

    Same arguments and results as attention_mass (without lse: it is computed here), float64.
    Materialises (B,H,L,L+2): for tests and small inputs only.
    """
    q, k = q.double(), k.double()
    b, h, n, d = q.shape
    group = h // k.shape[1]
    scale = softmax_scale(scale, d)
    real = (
        torch.ones(b, n, dtype=torch.bool, device=q.device)
        if key_padding_mask is None
        else key_padding_mask
    )
    scores = torch.einsum("bhid,bhjd->bhij", q, k.repeat_interleave(group, 1)) * scale
    scores = scores.masked_fill(~real[:, None, None, :], float("-inf"))
    extra = []
    if sink_k is not None:
        sk = sink_k.double()
        sk = (sk if sk.dim() == 3 else sk.expand(b, -1, -1)).repeat_interleave(group, 1)
        extra.append(torch.einsum("bhid,bhd->bhi", q, sk)[..., None] * scale)
    if sink_logit is not None:
        extra.append(sink_logit.double().view(1, h, 1, 1).expand(b, h, n, 1))
    probs = torch.cat([scores, *extra], dim=-1).softmax(-1)
    probs = probs * real[:, None, :, None]
    count = real.sum(1).double().clamp_min(1)[:, None, None]
    mass = probs[..., :n].sum(2) / count
    sink_mass = probs[..., n:].sum((2, 3)) / count[..., 0]
    return mass, sink_mass


def _attention_mass_backward(ctx, *grads):
    raise NotImplementedError(
        "attention_mass is not differentiable (an analysis of a forward's attention): detach "
        "q, k, lse and the sinks, or call it under torch.no_grad()"
    )


# Without an autograd kernel, PyTorch would backpropagate zeros with only a warning.
torch.library.register_autograd(_OP, _attention_mass_backward)
