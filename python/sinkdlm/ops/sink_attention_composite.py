"""Sink attention composed in plain PyTorch, for devices without sinkdlm's kernels.

The same composition as the C++ one (csrc/sink_attention/sink_attention_composed.h): a fused
attention over the L real keys that returns its log-sum-exp, then the sink merged in per query row
(the math is in csrc/sink_attention/sink_merge_params.h):

    s = scale * q . sink_k,   lse' = logaddexp(lse, s [, sink_logit])
    out' = out * exp(lse - lse') + exp(s - lse') * sink_v

and backward the attention's own backward fed ``out'`` and ``lse'`` plus the sink's gradients.
The attention over the keys is, by device:

* CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` and its ``_backward``;
* CUDA (float32/16-bit): ``aten._scaled_dot_product_efficient_attention`` and its backward
  (it takes a broadcast padding bias; K/V are repeated for GQA);
* anything else, and float64 on CUDA: the attention in blocks of query rows in plain torch ops,
  the backward recomputing each block's probabilities from the saved lse.

None of them builds an ``L x L`` matrix: the fused kernels work in tiles, the blocked form holds
``block x L`` scores at a time; except with ``segment_ids`` (packed rows), where the fused kernels
take a dense ``(B, 1, L, L)`` bias (neither has a varlen form here). A gradient through lse
enters the fused backwards as an extra value column of ones whose dO column is dlse (dS gains
P * dlse, the gradient of lse); the blocked backward adds it directly.
"""

from __future__ import annotations

import torch

from .common import accumulation_dtype, expand_sink, query_padding_in_force

__all__ = ["sink_attention_composite"]

QUERY_BLOCK = 256  # rows per block of the plain-torch attention: block x L scores at a time


def sink_attention_composite(
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
    """``(out, lse)`` of :func:`sinkdlm.sink_attention` on checked arguments (``scale``
    resolved), differentiable in q, k, v, the sinks and through lse. ``out`` has q's layout
    (``torch.empty_like(q)``), like the composed op's. q has Lq rows, k and v Lk."""
    rows = query_padding_in_force(q, k, key_padding_mask, query_padding_mask)
    return _SinkAttentionComposite.apply(
        q, k, v, sink_k, sink_v, sink_logit, key_padding_mask, rows, scale, segment_ids
    )


def _attention_kind(q: torch.Tensor) -> str:
    if q.device.type == "cpu":
        return "cpu_flash"
    if q.device.type == "cuda" and q.dtype != torch.float64:
        return "cuda_efficient"
    return "blocked"


def _key_bias(key_padding_mask, q, segment_ids=None):
    """Padding as an additive (B, 1, 1, L) bias (None without padding) for the fused kernels to
    broadcast: O(B L), rows 16-aligned for the CUDA kernel. With segments a dense (B, 1, L, L)
    bias: -inf where query i may not see key j (another segment, or a padded key)."""
    if key_padding_mask is None and segment_ids is None:
        return None
    B, L = (key_padding_mask if key_padding_mask is not None else segment_ids).shape
    width = -(-L // 16) * 16 if q.device.type == "cuda" else L
    rows = L if segment_ids is not None else 1
    bias = torch.zeros(B, 1, rows, width, dtype=q.dtype, device=q.device)[..., :L]
    hidden = torch.zeros(B, 1, rows, L, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        hidden |= ~key_padding_mask.view(B, 1, 1, L)
    if segment_ids is not None:
        hidden |= (segment_ids[:, :, None] != segment_ids[:, None, :]).unsqueeze(1)
    return bias.masked_fill_(hidden, float("-inf"))


def _fused_width(kind, head_dim, dlse_column=False):
    """The head dim the fused kernel sees: D (+1 for the dlse column), a multiple of 8 on CUDA."""
    width = head_dim + int(dlse_column)
    return width if kind == "cpu_flash" else -(-width // 8) * 8


def _widen(x, width, column=None):
    """x zero-padded to `width` columns, column D set to `column` ((B, H, L) or a scalar)."""
    D = x.shape[-1]
    if width == D:
        return x if x.stride(-1) == 1 else x.contiguous()
    y = x.new_zeros(x.shape[0], x.shape[2], x.shape[1], width).transpose(1, 2)
    y[..., :D] = x
    if column is not None:
        y[..., D] = column
    return y


def _repeat_heads(x, heads):
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], 1)


def _sum_heads(g, kv_heads):
    return g if g.shape[1] == kv_heads else g.unflatten(1, (kv_heads, -1)).sum(2)


def _empty_rng():
    return torch.empty((), dtype=torch.long)


# ---- attention over the real keys ---------------------------------------------------------


def _fused_forward(kind, q, k, v, bias, scale):
    """(out, lse) of the device's fused kernel; lse as a (B, H, L) view."""
    if kind == "cpu_flash":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=bias, scale=scale
        )
    B, H, L, _ = q.shape
    kk, vv = _repeat_heads(k, H), _repeat_heads(v, H)
    full_bias = bias.expand(B, H, L, bias.shape[-1]) if bias is not None else None
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, kk, vv, full_bias, True, 0.0, False, scale=scale
    )[:2]
    return out, lse[..., :L]


def _fused_backward(kind, dout, q, k, v, out, lse, bias, scale):
    if kind == "cpu_flash":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, False, attn_mask=bias, scale=scale
        )
    B, H, L, _ = q.shape
    kk, vv = _repeat_heads(k, H), _repeat_heads(v, H)
    full_bias = bias.expand(B, H, L, bias.shape[-1]) if bias is not None else None
    lse_padded = lse.new_zeros(B, H, -(-L // 32) * 32)
    lse_padded[..., :L] = lse
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        dout,
        q,
        kk,
        vv,
        full_bias,
        out,
        lse_padded,
        _empty_rng(),
        _empty_rng(),
        0.0,
        [True, True, True, False],
        False,
        scale=scale,
    )
    return dq, _sum_heads(dk, k.shape[1]), _sum_heads(dv, v.shape[1])


def _grouped_rows(x, kv_heads):
    """(B, H, n, D) -> (B, Hkv, G * n, D): a group's query heads as more rows of its K/V head."""
    B, H, n, D = x.shape
    return x.reshape(B, kv_heads, (H // kv_heads) * n, D)


def _blocked_scores(q_rows, k, key_padding_mask, scale, acc, segment_ids=None, i0=0, i1=0):
    """Scores of the grouped query rows (:func:`_grouped_rows` of queries [i0, i1))."""
    s = torch.matmul(q_rows.to(acc), k.to(acc).transpose(-1, -2)) * scale
    if key_padding_mask is not None:
        s = s.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    if segment_ids is not None:  # a group's rows are its heads' [i0, i1) one after another
        group = q_rows.shape[2] // (i1 - i0)
        rows = segment_ids[:, i0:i1].repeat(1, group)
        s = s.masked_fill((rows[:, :, None] != segment_ids[:, None, :])[:, None], float("-inf"))
    return s


def _blocked_forward(q, k, v, key_padding_mask, scale, segment_ids=None):
    B, H, L, D = q.shape
    Hkv, acc = k.shape[1], accumulation_dtype(q.dtype)
    out = q.new_empty(B, H, L, D)
    lse = q.new_empty(B, H, L, dtype=acc)
    for i0 in range(0, L, QUERY_BLOCK):
        i1 = min(L, i0 + QUERY_BLOCK)
        q_rows = _grouped_rows(q[:, :, i0:i1], Hkv)
        s = _blocked_scores(q_rows, k, key_padding_mask, scale, acc, segment_ids, i0, i1)
        m = s.amax(-1, keepdim=True).clamp_min(torch.finfo(acc).min)  # all-padded rows: no nan
        p = torch.exp(s - m)
        denom = p.sum(-1, keepdim=True)
        out[:, :, i0:i1] = (torch.matmul(p, v.to(acc)) / denom).view(B, H, i1 - i0, D)
        lse[:, :, i0:i1] = (m + denom.log()).view(B, H, i1 - i0)
    return out, lse


def _blocked_backward(dout, q, k, v, out, lse, dlse, key_padding_mask, scale, segment_ids=None):
    B, H, L, D = q.shape
    Hkv, acc = k.shape[1], accumulation_dtype(q.dtype)
    dq = torch.empty_like(q)
    dk, dv = torch.zeros_like(k, dtype=acc), torch.zeros_like(v, dtype=acc)
    k_acc, v_acc = k.to(acc), v.to(acc)
    for i0 in range(0, L, QUERY_BLOCK):
        i1 = min(L, i0 + QUERY_BLOCK)
        q_rows = _grouped_rows(q[:, :, i0:i1], Hkv).to(acc)
        do_rows = _grouped_rows(dout[:, :, i0:i1], Hkv).to(acc)
        s = _blocked_scores(q_rows, k, key_padding_mask, scale, acc, segment_ids, i0, i1)
        rows = _grouped_rows(lse[:, :, i0:i1, None], Hkv)
        p = torch.exp(s - rows)
        delta = (do_rows * _grouped_rows(out[:, :, i0:i1], Hkv).to(acc)).sum(-1, keepdim=True)
        if dlse is not None:
            delta = delta - _grouped_rows(dlse[:, :, i0:i1, None], Hkv)
        ds = p * (torch.matmul(do_rows, v_acc.transpose(-1, -2)) - delta)
        dq[:, :, i0:i1] = (torch.matmul(ds, k_acc) * scale).view(B, H, i1 - i0, D)
        dk += torch.matmul(ds.transpose(-1, -2), q_rows) * scale
        dv += torch.matmul(p.transpose(-1, -2), do_rows)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


# ---- the sink -----------------------------------------------------------------------------


def _sink_terms(q, sink_k, sink_v, sink_logit, scale):
    """Per row: the sink token's score s (B, H, L) and its value (B, H, D), and the logit sink
    broadcast to (B, H, L); None where absent. In the accumulation dtype."""
    B, H, L, _ = q.shape
    acc = accumulation_dtype(q.dtype)
    s = sk = sv = lam = None
    if sink_k is not None:
        group = H // sink_k.shape[-2]
        sk = expand_sink(sink_k, B).to(acc).repeat_interleave(group, 1)
        sv = expand_sink(sink_v, B).to(acc).repeat_interleave(group, 1)
        s = torch.matmul(q.to(acc), sk.unsqueeze(-1)).squeeze(-1) * scale
    if sink_logit is not None:
        lam = sink_logit.to(acc).view(1, H, 1).expand(B, H, L)
    return s, sk, sv, lam


def _merge(q, attn_out, attn_lse, sink_k, sink_v, sink_logit, rows, scale):
    """rows: the query padding in force (B, Lq), or None."""
    B, H, L, D = q.shape
    s, _, sv, lam = _sink_terms(q, sink_k, sink_v, sink_logit, scale)
    attn_lse = attn_lse.to(s.dtype if s is not None else accumulation_dtype(q.dtype))
    lse = torch.logsumexp(torch.stack([t for t in (attn_lse, s, lam) if t is not None]), 0)
    weight = torch.exp(attn_lse - lse).unsqueeze(-1)
    # (Rows that see no key give the kernels' 0 / 0 = NaN out, with weight 0: keep them 0.)
    merged = (attn_out.to(lse.dtype) * weight).masked_fill(weight == 0, 0)
    if s is not None:
        merged = merged + torch.exp(s - lse).unsqueeze(-1) * sv.unsqueeze(2)
    # Padded query rows, and rows that see nothing at all (lse -inf), return 0 and lse 0.
    empty = lse == float("-inf")
    if rows is not None:
        empty = empty | ~rows[:, None, :]
    merged = merged.masked_fill(empty.unsqueeze(-1), 0)
    lse = lse.masked_fill(empty, 0)
    out = torch.empty_like(q)
    out.copy_(merged)
    return out, lse


def _sink_grads(q, dout, out, lse, dlse, sink_k, sink_v, sink_logit, key_padding_mask, scale):
    """dq's sink part and the sink gradients (lse with +inf on padded rows)."""
    B, H, L, _ = q.shape
    s, sk, sv, lam = _sink_terms(q, sink_k, sink_v, sink_logit, scale)
    do_acc = dout.to(lse.dtype)
    delta = (do_acc * out.to(lse.dtype)).sum(-1)
    g = dlse if dlse is not None else torch.zeros_like(delta)
    dq_sink = dsink_k = dsink_v = dsink_logit = None
    if s is not None:
        p = torch.exp(s - lse)
        ds = p * (torch.matmul(do_acc, sv.unsqueeze(-1)).squeeze(-1) - delta + g)
        dq_sink = (scale * ds).unsqueeze(-1) * sk.unsqueeze(2)
        kv_heads = sink_k.shape[-2]
        dsink_k = _sum_heads(
            scale * torch.matmul(ds.unsqueeze(2), q.to(lse.dtype)).squeeze(2), kv_heads
        )
        dsink_v = _sum_heads(torch.matmul(p.unsqueeze(2), do_acc).squeeze(2), kv_heads)
        if sink_k.dim() == 2:  # one sink for the batch
            dsink_k, dsink_v = dsink_k.sum(0), dsink_v.sum(0)
        dsink_k, dsink_v = dsink_k.to(sink_k.dtype), dsink_v.to(sink_v.dtype)
    if lam is not None:
        dsink_logit = (torch.exp(lam - lse) * (g - delta)).sum((0, 2)).to(sink_logit.dtype)
    return dq_sink, dsink_k, dsink_v, dsink_logit


class _SinkAttentionComposite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sink_k, sink_v, sink_logit, key_padding_mask, rows, scale, segments):
        kind = _attention_kind(q)
        if kind == "blocked":
            attn_out, attn_lse = _blocked_forward(q, k, v, key_padding_mask, scale, segments)
        else:
            width = _fused_width(kind, q.shape[-1])
            attn_out, attn_lse = _fused_forward(
                kind,
                _widen(q, width),
                _widen(k, width),
                _widen(v, width),
                _key_bias(key_padding_mask, q, segments),
                scale,
            )
            attn_out = attn_out[..., : q.shape[-1]]
        out, lse = _merge(q, attn_out, attn_lse, sink_k, sink_v, sink_logit, rows, scale)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(
            q, k, v, sink_k, sink_v, sink_logit, key_padding_mask, rows, segments, out, lse
        )
        ctx.scale = scale
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, sink_k, sink_v, sink_logit, key_padding_mask, rows, segments, out, lse = (
            ctx.saved_tensors
        )
        scale = ctx.scale
        if dout is None:
            dout = torch.zeros_like(out)
        if rows is not None:  # padded query rows take no part: P = exp(S - inf) = 0
            lse = lse.masked_fill(~rows[:, None, :], float("inf"))
        kind = _attention_kind(q)
        if kind == "blocked":
            dq, dk, dv = _blocked_backward(
                dout, q, k, v, out, lse, dlse, key_padding_mask, scale, segments
            )
        else:
            D = q.shape[-1]
            width = _fused_width(kind, D, dlse_column=dlse is not None)
            ones = 1.0 if dlse is not None else None
            dq, dk, dv = _fused_backward(
                kind,
                _widen(dout, width, dlse.to(q.dtype) if dlse is not None else None),
                _widen(q, width),
                _widen(k, width),
                _widen(v, width, ones),
                _widen(out, width),
                lse.contiguous(),
                _key_bias(key_padding_mask, q, segments),
                scale,
            )
            dq, dk, dv = dq[..., :D], dk[..., :D], dv[..., :D]
        dq_sink, dsink_k, dsink_v, dsink_logit = _sink_grads(
            q, dout, out, lse, dlse, sink_k, sink_v, sink_logit, key_padding_mask, scale
        )
        if dq_sink is not None:
            dq = (dq.to(dq_sink.dtype) + dq_sink).to(q.dtype)
        return dq, dk, dv, dsink_k, dsink_v, dsink_logit, None, None, None, None
