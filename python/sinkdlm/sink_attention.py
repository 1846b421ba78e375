"""Sink attention: bidirectional attention where every query also sees one sink token.

The sink token attends only to itself, so its keys and values never depend on the input:
callers pass them as small ``sink_k`` / ``sink_v`` tensors instead of concatenating a token
onto every sequence. ``sink_attention`` runs the native kernel (``torch.ops.sinkdlm``) where
one is built for the tensors' device and a PyTorch composite with the same semantics
elsewhere. ``sink_attention_reference`` is the paper's literal form, for tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _C, _checks

__all__ = ["sink_attention", "sink_attention_reference", "sink_attention_mask"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# Devices with a native kernel in this build. Everything else takes the composite path.
_NATIVE_DEVICE_TYPES = frozenset(
    {"cpu", "meta"} | ({"cuda"} if _C.build_info()["cuda_linked"] else set())
)


def _fail(name: str, expected: str, got: object, exc: type[Exception] = ValueError):
    raise exc(f"sink_attention: {name} must be {expected}, got {got}")


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_args(q, k, v, sink_k, sink_v, sink_logit, key_padding_mask, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            _fail(name, "a torch.Tensor", type(t).__name__, TypeError)
        if t.dim() != 4:
            _fail(name, "4-D (B, H, L, D)", f"shape {_shape(t)}")
    if q.dtype not in _FLOAT_DTYPES:
        _fail("q", "float32, float64, float16 or bfloat16", q.dtype, TypeError)
    B, H, L, D = q.shape
    if D == 0:
        _fail("q", "a non-empty head dim", f"shape {_shape(q)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            _fail(name, f"{q.dtype} like q", t.dtype, TypeError)
        if t.device != q.device:
            _fail(name, f"on {q.device} like q", t.device)
        if t.shape[0] != B or t.shape[2] != L or t.shape[3] != D:
            _fail(name, f"(B, Hkv, L, D) = ({B}, Hkv, {L}, {D}) to match q", f"shape {_shape(t)}")
    if k.shape != v.shape:
        _fail("v", f"the shape of k {_shape(k)}", f"shape {_shape(v)}")
    Hkv = k.shape[1]
    if Hkv == 0 or H % Hkv != 0:
        _fail("k", f"a head count dividing q's H = {H} (GQA)", f"Hkv = {Hkv}")
    if (sink_k is None) != (sink_v is None):
        given, missing = ("sink_k", "sink_v") if sink_v is None else ("sink_v", "sink_k")
        raise ValueError(
            f"sink_attention: {given} was given without {missing}; pass both or neither"
        )
    if sink_k is not None:
        for name, t in (("sink_k", sink_k), ("sink_v", sink_v)):
            if not isinstance(t, torch.Tensor):
                _fail(name, "a torch.Tensor", type(t).__name__, TypeError)
            if t.dtype != q.dtype:
                _fail(name, f"{q.dtype} like q", t.dtype, TypeError)
            if t.device != q.device:
                _fail(name, f"on {q.device} like q", t.device)
            if _shape(t) not in ((Hkv, D), (B, Hkv, D)):
                _fail(
                    name,
                    f"(Hkv, D) = ({Hkv}, {D}) or (B, Hkv, D) = ({B}, {Hkv}, {D})",
                    f"shape {_shape(t)}",
                )
        if sink_k.shape != sink_v.shape:
            _fail("sink_v", f"the shape of sink_k {_shape(sink_k)}", f"shape {_shape(sink_v)}")
    if sink_logit is not None:
        if not isinstance(sink_logit, torch.Tensor) or not sink_logit.is_floating_point():
            _fail(
                "sink_logit",
                "a floating-point tensor",
                getattr(sink_logit, "dtype", sink_logit),
                TypeError,
            )
        if _shape(sink_logit) != (H,):
            _fail("sink_logit", f"(H,) = ({H},)", f"shape {_shape(sink_logit)}")
        if sink_logit.device != q.device:
            _fail("sink_logit", f"on {q.device} like q", sink_logit.device)
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            _fail(
                "key_padding_mask",
                "a bool tensor (True = real token)",
                getattr(key_padding_mask, "dtype", key_padding_mask),
                TypeError,
            )
        if _shape(key_padding_mask) != (B, L):
            _fail("key_padding_mask", f"(B, L) = ({B}, {L})", f"shape {_shape(key_padding_mask)}")
        if key_padding_mask.device != q.device:
            _fail("key_padding_mask", f"on {q.device} like q", key_padding_mask.device)
    _checks.softmax_scale("sink_attention", scale, q.dtype)


def softmax_scale(scale: float | None, head_dim: int) -> float:
    """The score scale: ``scale`` when given, else ``head_dim ** -0.5`` (SDPA's default)."""
    return float(scale) if scale is not None else head_dim**-0.5


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
    twice too: under ``create_graph=True`` the backward runs through the reference's PyTorch
    ops (O(L^2) memory) so that its result can be differentiated again.
    """
    _check_args(q, k, v, sink_k, sink_v, sink_logit, key_padding_mask, scale)
    scale = softmax_scale(scale, q.shape[-1])
    if q.device.type in _NATIVE_DEVICE_TYPES:
        out, lse = torch.ops.sinkdlm.sink_attention_fwd(
            q, k, v, sink_k, sink_v, sink_logit, key_padding_mask, scale
        )
        return (out, lse) if return_lse else out
    return _sink_attention_composite(
        q, k, v, sink_k, sink_v, sink_logit, key_padding_mask, scale, return_lse
    )


def _expand_sink(sink: torch.Tensor, batch: int) -> torch.Tensor:
    """(Hkv, D) or (B, Hkv, D) -> (B, Hkv, D)."""
    return sink.expand(batch, *sink.shape[-2:]) if sink.dim() == 2 else sink


def _sink_attention_composite(
    q, k, v, sink_k, sink_v, sink_logit, key_padding_mask, scale, return_lse
):
    """Devices without a native kernel: SDPA on ``[sink ; kv]`` (whatever backend the device
    has), or the reference math where SDPA cannot express the request (logit sink, lse)."""
    if sink_logit is not None or return_lse:
        return sink_attention_reference(
            q,
            k,
            v,
            sink_k,
            sink_v,
            sink_logit=sink_logit,
            key_padding_mask=key_padding_mask,
            scale=scale,
            return_lse=return_lse,
        )
    B, H, L, _ = q.shape
    attn_mask = None
    if sink_k is not None:
        k = torch.cat([_expand_sink(sink_k, B).unsqueeze(2), k], dim=2)
        v = torch.cat([_expand_sink(sink_v, B).unsqueeze(2), v], dim=2)
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


def sink_attention_mask(
    L: int, sink_position: int = 0, key_padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Dense mask of the paper's form for a sequence with a sink token inserted.

    The sequence has ``L + 1`` tokens with the sink at index ``sink_position``
    (``0 <= sink_position <= L``). The sink's row sees only itself; every other row sees
    the sink and every real token.

    Args:
        L: number of real tokens.
        sink_position: where the sink sits in the ``L + 1`` sequence.
        key_padding_mask: optional bool ``(B, L)``, True = real token, for the real tokens.
            Padded rows still see the sink, so no row is fully masked.

    Returns:
        bool ``(L + 1, L + 1)``, or ``(B, L + 1, L + 1)`` with a padding mask; True = may
        attend. Use it as ``attn_mask=mask`` (or ``mask[:, None]``) in
        ``F.scaled_dot_product_attention``.
    """
    if not 0 <= sink_position <= L:
        raise ValueError(
            f"sink_attention_mask: sink_position must be in [0, {L}], got {sink_position}"
        )
    device = key_padding_mask.device if key_padding_mask is not None else None
    n = L + 1
    mask = torch.ones(n, n, dtype=torch.bool, device=device)
    mask[sink_position, :] = False
    mask[sink_position, sink_position] = True
    if key_padding_mask is None:
        return mask
    if (
        key_padding_mask.dtype != torch.bool
        or key_padding_mask.dim() != 2
        or key_padding_mask.shape[1] != L
    ):
        raise ValueError(
            f"sink_attention_mask: key_padding_mask must be bool (B, {L}), got "
            f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
        )
    B = key_padding_mask.shape[0]
    real = torch.cat(
        [
            key_padding_mask[:, :sink_position],
            key_padding_mask.new_ones(B, 1),
            key_padding_mask[:, sink_position:],
        ],
        dim=1,
    )
    return mask.unsqueeze(0) & real[:, None, :]


def sink_attention_reference(
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
    sink_position: int = 0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``sink_attention`` written the paper's way, in plain PyTorch (O(L^2) memory).

    A real sink token is inserted into the sequence at ``sink_position`` and attention runs
    with the dense mask of :func:`sink_attention_mask`; the sink's own row is dropped from
    the result. Same arguments, shapes and return values as :func:`sink_attention`. Computes
    in the inputs' dtype: pass float64 tensors for a reference.
    """
    _check_args(q, k, v, sink_k, sink_v, sink_logit, key_padding_mask, scale)
    B, H, L, D = q.shape
    group = H // k.shape[1]
    scale = softmax_scale(scale, D)
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    has_token = sink_k is not None
    if has_token:
        if not 0 <= sink_position <= L:
            raise ValueError(
                f"sink_attention_reference: sink_position must be in [0, {L}], got {sink_position}"
            )
        sk = _expand_sink(sink_k, B).repeat_interleave(group, dim=1).unsqueeze(2)
        sv = _expand_sink(sink_v, B).repeat_interleave(group, dim=1).unsqueeze(2)
        p = sink_position

        def insert(x, token):
            return torch.cat([x[:, :, :p], token, x[:, :, p:]], dim=2)

        # The sink's query is irrelevant (its row sees only itself): reuse its key.
        q, k, v = insert(q, sk), insert(k, sk), insert(v, sv)
        mask = sink_attention_mask(L, p, key_padding_mask)
    elif key_padding_mask is not None:
        mask = key_padding_mask[:, None, :].expand(B, L, L)
    else:
        mask = None
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        mask = mask if mask.dim() == 3 else mask.unsqueeze(0)
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        # A row that sees no key (a padded query of an all-padding sequence, no sink token) is
        # zeroed below; finite scores keep the NaN of an all -inf softmax out of the gradients.
        scores = scores.masked_fill(~mask.any(-1)[:, None, :, None], 0.0)
    if sink_logit is not None:
        logit = sink_logit.to(scores.dtype).view(1, H, 1, 1).expand(B, H, scores.shape[2], 1)
        scores = torch.cat([scores, logit], dim=-1)
        v = torch.cat([v, v.new_zeros(B, H, 1, D)], dim=2)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    if has_token:
        keep = [i for i in range(L + 1) if i != sink_position]
        out, lse = out[:, :, keep], lse[:, :, keep]
    if key_padding_mask is not None:
        padded = ~key_padding_mask[:, None, :]
        out = out.masked_fill(padded[..., None], 0)
        lse = lse.masked_fill(padded, 0)
    lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    out = out.contiguous()
    return (out, lse) if return_lse else out


# ---- op registration: fake kernels and autograd -------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("sinkdlm::sink_attention_fwd")
def _sink_attention_fwd_fake(q, k, v, sink_k, sink_v, sink_logit, key_padding_mask, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=_acc_dtype(q.dtype))


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
    gradients of the float64/float32 reference, taken with a graph so that they can be
    differentiated again. O(L^2) memory, like the reference; the first-order backward stays
    the kernel's."""
    dtype = _acc_dtype(inputs[0].dtype)
    wanted = [i for i, t in enumerate(inputs) if t is not None and ctx.needs_input_grad[i]]
    acc = [t.to(dtype) if t is not None else None for t in inputs]
    out, lse = sink_attention_reference(
        *acc[:5],
        sink_logit=acc[5],
        key_padding_mask=key_padding_mask,
        scale=ctx.scale,
        return_lse=True,
    )
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


torch.library.register_autograd(
    "sinkdlm::sink_attention_fwd", _backward, setup_context=_setup_context
)
