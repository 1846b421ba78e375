"""Sink attention: bidirectional attention where every query also sees one sink token.

The sink token attends only to itself, so its keys and values never depend on the input:
callers pass them as small ``sink_k`` / ``sink_v`` tensors instead of concatenating a token
onto every sequence. ``sink_attention`` runs a kernel of ``torch.ops.sinkdlm`` where
the dispatcher has one for the tensors' device and a PyTorch composite with the same semantics
elsewhere. ``sinkdlm.sink_attention_reference`` (ops/reference.py) is the paper's literal form.

Paths (``backend=``):

* ``"native"``: sinkdlm's own CPU kernel (``csrc/sink_attention/sink_attention_cpu.cpp``).
* ``"composed"``: ATen's fused attention over the real keys (the kernel
  ``F.scaled_dot_product_attention`` would run), then the sink merged in through the
  log-sum-exp by a sinkdlm kernel, forward and backward (``csrc/sink_attention/
  sink_attention_composed.h``). The op ``torch.ops.sinkdlm.sink_attention_composed_fwd`` on the
  CPU and CUDA, the same math in plain torch ops (``ops/sink_attention_composite.py``) elsewhere.
* ``"auto"`` (default): on the CPU, native or composed by a rule over the CPU's instruction
  sets and the dtype (``ops/cpu_paths.py``: composed for bfloat16 on AMX CPUs and for a
  float16 forward without gradients on avx512_fp16 ones, native else);
  elsewhere whatever kernel the dispatcher holds for the device under
  ``sinkdlm::sink_attention_fwd``: the composed one on CUDA; on devices without one (MPS, XPU, a
  CUDA torch built without nvcc, and float64 on CUDA, which ATen's fused kernels lack) the
  plain-torch composition.
"""

from __future__ import annotations

import torch

from . import cpu_paths
from .checks import check_sink_attention_args
from .common import accumulation_dtype, has_native_kernel, softmax_scale
from .reference import dense_sink_attention
from .sink_attention_composite import sink_attention_composite

__all__ = ["sink_attention"]

BACKENDS = ("auto", "native", "composed")
_OP = "sinkdlm::sink_attention_fwd"
_COMPOSED_OP = "sinkdlm::sink_attention_composed_fwd"


def _pick_op(backend: str, q: torch.Tensor, needs_grad: bool = False, packed: bool = False):
    """The op that runs ``backend`` for q (``needs_grad``: a backward follows; ``packed``:
    segment ids given), or None for the plain-torch composition."""
    device = q.device.type
    no_fused_kernel = device == "cuda" and q.dtype == torch.float64  # ATen's fused: no float64
    # Else auto is sink_attention_fwd's kernel: native. Packed rows stay native on the CPU, where
    # the composed op needs a dense (B, 1, L, L) bias for them.
    if backend == "auto" and device == "cpu" and not packed:
        if cpu_paths.cpu_auto_backend(cpu_paths.CPU_FEATURES, q.dtype, needs_grad) == "composed":
            backend = "composed"
    if backend == "native":
        if device not in ("cpu", "meta") or not has_native_kernel(_OP, device):
            raise ValueError(
                f"sink_attention: backend='native' is sinkdlm's own CPU kernel; for tensors on "
                f"{device} use backend='auto' or 'composed'"
            )
        return torch.ops.sinkdlm.sink_attention_fwd
    op, fn = (
        (_COMPOSED_OP, torch.ops.sinkdlm.sink_attention_composed_fwd)
        if backend == "composed"
        else (_OP, torch.ops.sinkdlm.sink_attention_fwd)
    )
    return fn if has_native_kernel(op, device) and not no_fused_kernel else None


def _check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(
            f"sink_attention: backend must be one of 'auto', 'native', 'composed', got {backend!r}"
        )


def sink_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink_k: torch.Tensor | None = None,
    sink_v: torch.Tensor | None = None,
    *,
    sink_logit: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    query_padding_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Bidirectional attention over ``[sink ; keys]`` without concatenating the sink.

    Args:
        q: ``(B, H, Lq, D)`` float32, float64, float16 or bfloat16; any strides.
        k, v: ``(B, Hkv, Lk, D)``, q's dtype and device; ``H % Hkv == 0`` (GQA / MQA). Lk may
            differ from Lq: a block's queries over cached keys plus their own.
        sink_k, sink_v: the sink token's key and value, ``(Hkv, D)`` (one sink for the
            batch) or ``(B, Hkv, D)``; both or neither. With neither this is plain
            non-causal attention (plus ``sink_logit`` if given).
        sink_logit: optional floating ``(H,)``: a per-head logit with no value (the gpt-oss
            form of a sink), added to each softmax denominator in logit units (not scaled)
            and included in the log-sum-exp. May be combined with a sink token.
        key_padding_mask: optional bool ``(B, Lk)``, True = real token. Padded keys get no
            attention. The sink is always visible.
        query_padding_mask: optional bool ``(B, Lq)``, True = real query: padded query rows
            return zeros (and lse 0), as do rows that see no key at all. Defaults to
            ``key_padding_mask`` when Lq == Lk (queries and keys are then the same tokens), else
            to every query being real.
        segment_ids: optional int32/int64 ``(B, L)`` for packed rows (several documents in one
            row, as a padding-free collator makes them): a query sees the sink and the keys
            with its own id only. Non-decreasing along each row (one run of equal ids per
            document; checked, a host sync); needs Lq == Lk. A batch flattened to one row with
            ``cu_seqlens`` converts with :func:`sinkdlm.packing.segment_ids_from_cu_seqlens`.
            The native CPU kernel skips the key tiles outside a query tile's documents; the
            composed path runs flash attention's varlen form on CUDA for float16/bfloat16, and
            a dense ``(B, 1, L, L)`` bias elsewhere (CPU, float32 on CUDA).
        scale: score scale, default ``D ** -0.5``.
        return_lse: also return the log-sum-exp of each row's scores.
        backend: ``"auto"`` (default), ``"native"`` (sinkdlm's CPU kernel) or ``"composed"``
            (ATen's fused attention with the sink merged in); see the module docstring.

    Returns:
        ``out`` ``(B, H, Lq, D)`` in q's dtype, and with ``return_lse`` the ``(B, H, Lq)``
        log-sum-exp in float32 (float64 for float64 inputs). ``out`` has q's layout
        (``torch.empty_like(q)``) on every path, as SDPA's flash kernel does: for a q that is a
        ``(B, L, H, D)`` projection viewed as heads, ``out.transpose(1, 2).reshape(B, L, H * D)``
        is then free.

    Differentiable in q, k, v, sink_k, sink_v and sink_logit (and through the returned lse),
    twice too: under ``create_graph=True`` the backward runs through the dense form's PyTorch
    ops (O(L^2) memory) so that its result can be differentiated again.
    """
    check_sink_attention_args(
        q,
        k,
        v,
        sink_k,
        sink_v,
        sink_logit,
        key_padding_mask,
        scale,
        query_padding_mask,
        segment_ids,
    )
    _check_backend(backend)
    scale = softmax_scale(scale, q.shape[-1])
    args = (
        q,
        k,
        v,
        sink_k,
        sink_v,
        sink_logit,
        key_padding_mask,
        query_padding_mask,
        scale,
        segment_ids,
    )
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, sink_k, sink_v, sink_logit)
    )
    op = _pick_op(backend, q, needs_grad, segment_ids is not None)
    out, lse = op(*args) if op is not None else sink_attention_composite(*args)
    return (out, lse) if return_lse else out


# ---- op registration: fake kernels and autograd -------------------------------------------
# Two op pairs, one rule for both: sink_attention_{fwd,bwd} (native kernel on the CPU, composed
# on CUDA) and sink_attention_composed_{fwd,bwd}. The fakes promise the layouts the kernels
# return: out like q on both; the gradients contiguous from the native CPU kernel; from the
# composed path (B, L, H, D)-major on the CPU (ATen's CPU flash backward gives every gradient so,
# and a copy to the inputs' strides would be one more pass over each) and empty_like on CUDA.


def _bwd_fake(q, k, v, sink_k, sink_v, sink_logit, composed):
    def like(t):
        if t is None:
            return q.new_empty(0)
        if not composed or t.dim() != 4:
            return t.new_empty(t.shape)
        if t.device.type == "cuda":
            return torch.empty_like(t)
        B, H, L, D = t.shape
        return t.new_empty(B, L, H, D).transpose(1, 2)

    return like(q), like(k), like(v), like(sink_k), like(sink_v), like(sink_logit)


def _native_on(device_type: str) -> bool:
    """sink_attention_{fwd,bwd} run sinkdlm's own kernel on the CPU (and meta), composed else."""
    return device_type in ("cpu", "meta")


def _sink_attention_fwd_fake(
    q,
    k,
    v,
    sink_k,
    sink_v,
    sink_logit,
    key_padding_mask,
    query_padding_mask,
    scale,
    segment_ids=None,
):
    """Both forward ops: out like q, lse (B, H, Lq) in the accumulation type."""
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=accumulation_dtype(q.dtype))


torch.library.register_fake(_OP)(_sink_attention_fwd_fake)
torch.library.register_fake(_COMPOSED_OP)(_sink_attention_fwd_fake)


def _bwd_fake_of(always_composed: bool):
    """The fake of a backward op: the native op's gradients are laid out as its kernel lays them
    out where it runs sinkdlm's own kernel (_native_on), as the composed op's elsewhere."""

    def fake(grad_out, grad_lse, q, k, v, sink_k, sink_v, sink_logit, *rest, **kwargs):
        composed = always_composed or not _native_on(q.device.type)
        return _bwd_fake(q, k, v, sink_k, sink_v, sink_logit, composed)

    return fake


torch.library.register_fake("sinkdlm::sink_attention_bwd")(_bwd_fake_of(False))
torch.library.register_fake("sinkdlm::sink_attention_composed_bwd")(_bwd_fake_of(True))


def _setup_context(ctx, inputs, output):
    q, k, v, sink_k, sink_v, sink_logit, key_padding_mask, query_padding_mask, scale = inputs[:9]
    segment_ids = inputs[9] if len(inputs) > 9 else None
    out, lse = output
    # An unused lse then brings None, not zeros: the backward skips its gradient's work.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(
        q,
        k,
        v,
        sink_k,
        sink_v,
        sink_logit,
        key_padding_mask,
        query_padding_mask,
        segment_ids,
        out,
        lse,
    )
    ctx.scale = scale
    ctx.num_inputs = len(inputs)


def _differentiable_backward(ctx, inputs, masks, grad_out, grad_lse):
    """The backward for ``create_graph=True`` (double backward, Hessian-vector products): the
    gradients of the dense form in the accumulation dtype, taken with a graph so that they can
    be differentiated again. O(L^2) memory; the first-order backward stays the kernel's."""
    dtype = accumulation_dtype(inputs[0].dtype)
    wanted = [i for i, t in enumerate(inputs) if t is not None and ctx.needs_input_grad[i]]
    acc = [t.to(dtype) if t is not None else None for t in inputs]
    key_padding_mask, query_padding_mask, segment_ids = masks
    out, lse = dense_sink_attention(
        *acc,
        key_padding_mask,
        ctx.scale,
        query_padding_mask=query_padding_mask,
        segment_ids=segment_ids,
    )
    outputs, cotangents = [], []
    for y, dy in ((out, grad_out), (lse, grad_lse)):
        if dy is not None:
            outputs.append(y)
            cotangents.append(dy.to(y.dtype))
    grads = torch.autograd.grad(
        outputs, [inputs[i] for i in wanted], cotangents, create_graph=True, allow_unused=True
    )
    result = [None] * ctx.num_inputs
    for i, g in zip(wanted, grads, strict=True):
        result[i] = None if g is None else g.to(inputs[i].dtype)
    return tuple(result)


def _autograd(bwd_op):
    def backward(ctx, grad_out, grad_lse):
        (
            q,
            k,
            v,
            sink_k,
            sink_v,
            sink_logit,
            key_padding_mask,
            query_padding_mask,
            segment_ids,
            out,
            lse,
        ) = ctx.saved_tensors
        masks = (key_padding_mask, query_padding_mask, segment_ids)
        if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable too
            inputs = (q, k, v, sink_k, sink_v, sink_logit)
            return _differentiable_backward(ctx, inputs, masks, grad_out, grad_lse)
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv, dsink_k, dsink_v, dsink_logit = bwd_op(
            grad_out,
            grad_lse,
            q,
            k,
            v,
            sink_k,
            sink_v,
            sink_logit,
            key_padding_mask,
            query_padding_mask,
            out,
            lse,
            ctx.scale,
            segment_ids,
        )
        grads = (
            dq,
            dk,
            dv,
            dsink_k if sink_k is not None else None,
            dsink_v if sink_v is not None else None,
            dsink_logit if sink_logit is not None else None,
        )
        return grads + (None,) * (ctx.num_inputs - len(grads))

    return backward


torch.library.register_autograd(
    _OP, _autograd(torch.ops.sinkdlm.sink_attention_bwd), setup_context=_setup_context
)
torch.library.register_autograd(
    _COMPOSED_OP,
    _autograd(torch.ops.sinkdlm.sink_attention_composed_bwd),
    setup_context=_setup_context,
)
