"""TEMPORARY stand-in for the lead's sink attention operator (plain PyTorch, same public API).

Dropped at merge in favour of main's native op; exists only so the Hugging Face integration can be
developed and tested before main lands it.
"""

import torch


def _expand_sink(sink, batch, heads_kv, head_dim, name):
    if sink.dim() == 2:
        sink = sink.unsqueeze(0)
    if tuple(sink.shape[1:]) != (heads_kv, head_dim):
        raise ValueError(f"{name} must be (Hkv, D) or (B, Hkv, D) with Hkv={heads_kv}, "
                         f"D={head_dim}; got {tuple(sink.shape)}")
    return sink.expand(batch, heads_kv, head_dim)


def sink_attention(q, k, v, sink_k=None, sink_v=None, *, sink_logit=None, key_padding_mask=None,
                   scale=None, return_lse=False):
    """Sink attention. q (B,H,L,D); k,v (B,Hkv,L,D); sink_k/sink_v (Hkv,D) or (B,Hkv,D).

    Returns out (B,H,L,D) in q's dtype (and the float32 / float64 lse (B,H,L) if return_lse).
    """
    if (sink_k is None) != (sink_v is None):
        raise ValueError("sink_k and sink_v must be given together")
    batch, heads, length, head_dim = q.shape
    heads_kv = k.shape[1]
    if heads % heads_kv:
        raise ValueError(f"H={heads} must be a multiple of Hkv={heads_kv}")
    rep = heads // heads_kv
    scale = head_dim**-0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf = q.to(acc)
    kf = k.to(acc).repeat_interleave(rep, dim=1)
    vf = v.to(acc).repeat_interleave(rep, dim=1)
    scores = [qf @ kf.transpose(-1, -2) * scale]
    if key_padding_mask is not None:
        scores[0] = scores[0].masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    values = [vf]
    if sink_k is not None:
        sk = _expand_sink(sink_k, batch, heads_kv, head_dim, "sink_k").to(acc)
        sv = _expand_sink(sink_v, batch, heads_kv, head_dim, "sink_v").to(acc)
        sk = sk.repeat_interleave(rep, dim=1).unsqueeze(2)
        sv = sv.repeat_interleave(rep, dim=1).unsqueeze(2)
        scores.insert(0, qf @ sk.transpose(-1, -2) * scale)
        values.insert(0, sv)
    if sink_logit is not None:
        scores.append(sink_logit.to(acc).view(1, heads, 1, 1).expand(batch, heads, length, 1))
        values.append(torch.zeros_like(vf[:, :, :1]))
    logits = torch.cat(scores, dim=-1)
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse.unsqueeze(-1)).nan_to_num(0.0)
    out = probs @ torch.cat(values, dim=2)
    if key_padding_mask is not None:
        real = key_padding_mask[:, None, :]
        out = out * real.unsqueeze(-1)
        lse = torch.where(real, lse, torch.zeros_like(lse))
    out = out.to(q.dtype)
    if return_lse:
        return out, lse
    return out


def sink_attention_mask(length, sink_position, key_padding_mask=None):
    """Dense (L+1, L+1) or (B, L+1, L+1) bool mask, True = may attend; sink at sink_position."""
    total = length + 1
    pos = sink_position % total
    device = key_padding_mask.device if key_padding_mask is not None else None
    mask = torch.ones(total, total, dtype=torch.bool, device=device)
    mask[pos] = False
    mask[pos, pos] = True
    if key_padding_mask is None:
        return mask
    keys = torch.ones(key_padding_mask.shape[0], total, dtype=torch.bool, device=device)
    keys[:, [i for i in range(total) if i != pos]] = key_padding_mask
    mask = mask.unsqueeze(0) & keys[:, None, :]
    # padded query rows see only the sink, so they stay finite
    mask[:, :, pos] = True
    return mask


def sink_attention_reference(q, k, v, sink_k=None, sink_v=None, *, sink_logit=None,
                             key_padding_mask=None, scale=None, return_lse=False, sink_position=0):
    """The paper's literal form: a real sink token inserted at sink_position with a dense mask."""
    if sink_k is None:
        return sink_attention(q, k, v, sink_logit=sink_logit, key_padding_mask=key_padding_mask,
                              scale=scale, return_lse=return_lse)
    batch, heads, length, head_dim = q.shape
    heads_kv = k.shape[1]
    sk = _expand_sink(sink_k, batch, heads_kv, head_dim, "sink_k").unsqueeze(2).to(k.dtype)
    sv = _expand_sink(sink_v, batch, heads_kv, head_dim, "sink_v").unsqueeze(2).to(v.dtype)
    pos = sink_position % (length + 1)
    kx = torch.cat([k[:, :, :pos], sk, k[:, :, pos:]], dim=2)
    vx = torch.cat([v[:, :, :pos], sv, v[:, :, pos:]], dim=2)
    qx = torch.cat([q[:, :, :pos], torch.zeros_like(q[:, :, :1]), q[:, :, pos:]], dim=2)
    mask = sink_attention_mask(length, pos, key_padding_mask)
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    rep = heads // heads_kv
    out = torch.nn.functional.scaled_dot_product_attention(
        qx, kx.repeat_interleave(rep, 1), vx.repeat_interleave(rep, 1), attn_mask=mask, scale=scale)
    out = torch.cat([out[:, :, :pos], out[:, :, pos + 1:]], dim=2)
    if key_padding_mask is not None:
        out = out * key_padding_mask[:, None, :, None]
    if return_lse:
        raise NotImplementedError("stand-in reference has no lse")
    return out
