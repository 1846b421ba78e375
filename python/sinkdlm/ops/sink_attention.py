"""Sink attention: bidirectional attention where every query also sees one sink token.

The sink token attends only to itself, so its keys and values never depend on the input:
callers pass them as small ``sink_k`` / ``sink_v`` tensors instead of concatenating a token
onto every sequence. ``sink_attention`` runs the native kernel (``torch.ops.sinkdlm``) where
the dispatcher has one for the tensors' device and a PyTorch composite with the same semantics
elsewhere. ``sinkdlm.sink_attention_reference`` (ops/reference.py) is the paper's literal form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_sink_attention_args
from .common import accumulation_dtype, expand_sink, has_native_kernel, softmax_scale
from .reference import dense_sink_attention

__all__ = ["sink_attention"]

_OP = "sinkdlm::sink_attention_fwd"


def sink_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink_k: torch.Tensor | None = None,
    sink_v: torch.Tensor | None = None,
    *,
    sink_logit: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Bidirectional attention over ``[sink ; keys]`` without concatenating the sink.

    Args:
        q: ``(B, H, L, D)`` float32, float64, float16 or bfloat16; any strides.
        k, v: ``(B, Hkv, L, D)``, q's dtype and device; ``H % Hkv == 0`` (GQA / MQA).
        sink_k, sink_v: the sink token's key and value, ``(Hkv, D)`` (one sink for the
            batch) or ``(B, Hkv, D)``; both or neither. With neither this is plain
            non-causal attention (plus ``sink_logit`` if given).
        sink_logit: optional floating ``(H,)``: a per-head logit with no value (the gpt-oss
            form of a sink), added to each softmax denominator in logit units (not scaled)
            and included in the log-sum-exp. May be combined with a sink token.
        key_padding_mask: optional bool ``(B, L)``, True = real token. Padded keys get no
            attention; padded query rows return zeros (and lse 0). The sink is always visible.
        scale: score scale, default ``D ** -0.5``.
        return_lse: also return the log-sum-exp of each row's scores.

    Returns:
        ``out`` ``(B, H, L, D)`` contiguous in q's dtype, and with ``return_lse`` the
        ``(B, H, L)`` log-sum-exp in float32 (float64 for float64 inputs).

    Differentiable in q, k, v, sink_k, sink_v and sink_logit (and through the returned lse),
    twice too: under ``create_graph=True`` the backward runs through the dense form's PyTorch
    ops (O(L^2) memory) so that its result can be differentiated again.
    """
    check_sink_attention_args(q, k, v, sink_k, sink_v, sink_logit, key_padding_mask, scale)
    scale = softmax_scale(scale, q.shape[-1])
    if has_native_kernel(_OP, q.device.type):
        out, lse = torch.ops.sinkdlm.sink_attention_fwd(
            q, k, v, sink_k, sink_v, sink_logit, key_padding_mask, scale
        )
        return (out, lse) if return_lse else out
    return _sink_attention_composite(
        q, k, v, sink_k, sink_v, sink_logit, key_padding_mask, scale, return_lse
    )


def _sink_attention_composite(
    q, k, v, sink_k, sink_v, sink_logit, key_padding_mask, scale, return_lse
):
    """Devices without a native kernel: SDPA on ``[sink ; kv]`` (whatever backend the device
    has), or the dense form where SDPA cannot express the request (logit sink, lse). Arguments
    checked, ``scale`` resolved."""
    if sink_logit is not None or return_lse:
        out, lse = dense_sink_attention(
            q, k, v, sink_k, sink_v, sink_logit, key_padding_mask, scale
        )
        return (out, lse) if return_lse else out
    B, H, L, _ = q.shape
    attn_mask = None
    if sink_k is not None:
        k = torch.cat([expand_sink(sink_k, B).unsqueeze(2), k], dim=2)
        v = torch.cat([expand_sink(sink_v, B).unsqueeze(2), v], dim=2)
    if key_padding_mask is not None:
        keys = key_padding_mask
        if sink_k is not None:
            keys = torch.cat([keys.new_ones(B, 1), keys], dim=1)
        attn_mask = keys[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=H != k.shape[1]
    )
    if key_padding_mask is not None:
        out = out.masked_fill(~key_padding_mask[:, None, :, None], 0)
    return out.contiguous()


# ---- op registration: fake kernels and autograd -------------------------------------------


@torch.library.register_fake(_OP)
def _sink_attention_fwd_fake(q, k, v, sink_k, sink_v, sink_logit, key_padding_mask, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=accumulation_dtype(q.dtype))


@torch.library.register_fake("sinkdlm::sink_attention_bwd")
def _sink_attention_bwd_fake(
    grad_out, grad_lse, q, k, v, sink_k, sink_v, sink_logit, key_padding_mask, out, lse, scale
):
    def like(t):
        return t.new_empty(t.shape) if t is not None else q.new_empty(0)

    return like(q), like(k), like(v), like(sink_k), like(sink_v), like(sink_logit)


def _setup_context(ctx, inputs, output):
    q, k, v, sink_k, sink_v, sink_logit, key_padding_mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, sink_k, sink_v, sink_logit, key_padding_mask, out, lse)
    ctx.scale = scale


def _differentiable_backward(ctx, inputs, key_padding_mask, grad_out, grad_lse):
    """The backward for ``create_graph=True`` (double backward, Hessian-vector products): the
    gradients of the dense form in the accumulation dtype, taken with a graph so that they can
    be differentiated again. O(L^2) memory; the first-order backward stays the kernel's."""
    dtype = accumulation_dtype(inputs[0].dtype)
    wanted = [i for i, t in enumerate(inputs) if t is not None and ctx.needs_input_grad[i]]
    acc = [t.to(dtype) if t is not None else None for t in inputs]
    out, lse = dense_sink_attention(*acc, key_padding_mask, ctx.scale)
    outputs, cotangents = [], []
    for y, dy in ((out, grad_out), (lse, grad_lse)):
        if dy is not None:
            outputs.append(y)
            cotangents.append(dy.to(y.dtype))
    grads = torch.autograd.grad(
        outputs, [inputs[i] for i in wanted], cotangents, create_graph=True, allow_unused=True
    )
    result = [None] * 8
    for i, g in zip(wanted, grads, strict=True):
        result[i] = None if g is None else g.to(inputs[i].dtype)
    return tuple(result)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, sink_k, sink_v, sink_logit, key_padding_mask, out, lse = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable too
        inputs = (q, k, v, sink_k, sink_v, sink_logit)
        return _differentiable_backward(ctx, inputs, key_padding_mask, grad_out, grad_lse)
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, dsink_k, dsink_v, dsink_logit = torch.ops.sinkdlm.sink_attention_bwd(
        grad_out,
        grad_lse,
        q,
        k,
        v,
        sink_k,
        sink_v,
        sink_logit,
        key_padding_mask,
        out,
        lse,
        ctx.scale,
    )
    return (
        dq,
        dk,
        dv,
        dsink_k if sink_k is not None else None,
        dsink_v if sink_v is not None else None,
        dsink_logit if sink_logit is not None else None,
        None,
        None,
    )


torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)
