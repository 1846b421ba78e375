"""TEMPORARY plain-PyTorch stand-in for sinkdlm.sink_attention (the lead's native op replaces it).

Implements exactly the API in notes/BRIEF.md so that branches depending on it can be developed and
tested before main lands the real operator. Materialises the (L x (L+1)) score matrix.
"""

from __future__ import annotations

import math

import torch


def sink_attention(
    q,
    k,
    v,
    sink_k=None,
    sink_v=None,
    *,
    sink_logit=None,
    key_padding_mask=None,
    scale=None,
    return_lse=False,
):
    """Bidirectional attention over [sink ; tokens] (stand-in; see BRIEF.md for the contract).

    q (B,H,L,D); k, v (B,Hkv,L,D); sink_k/sink_v (Hkv,D) or (B,Hkv,D); sink_logit (H,);
    key_padding_mask bool (B,L), True = real. Returns out (B,H,L,D) in q.dtype and, with
    return_lse, lse (B,H,L) float32 (float64 for float64 inputs).
    """
    if (sink_k is None) != (sink_v is None):
        raise ValueError("sink_k and sink_v must be given together")
    B, H, L, D = q.shape
    hkv = k.shape[1]
    if H % hkv:
        raise ValueError(f"q heads {H} not a multiple of k heads {hkv}")
    group = H // hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    kf = kf.repeat_interleave(group, dim=1)
    vf = vf.repeat_interleave(group, dim=1)
    scores = torch.einsum("bhid,bhjd->bhij", qf, kf) * scale
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    extra = []
    if sink_k is not None:
        sk = sink_k.to(acc)
        sv = sink_v.to(acc)
        if sk.dim() == 2:
            sk, sv = sk.expand(B, -1, -1), sv.expand(B, -1, -1)
        sk = sk.repeat_interleave(group, dim=1)
        sv = sv.repeat_interleave(group, dim=1)
        extra.append(("kv", torch.einsum("bhid,bhd->bhi", qf, sk)[..., None] * scale, sv))
    if sink_logit is not None:
        extra.append(("logit", sink_logit.to(acc).view(1, H, 1, 1).expand(B, H, L, 1), None))
    full = torch.cat([scores] + [e[1] for e in extra], dim=-1)
    lse = torch.logsumexp(full, dim=-1)
    probs = torch.exp(full - lse[..., None])
    out = torch.einsum("bhij,bhjd->bhid", probs[..., :L], vf)
    col = L
    for kind, _, sv in extra:
        if kind == "kv":
            out = out + probs[..., col : col + 1] * sv[:, :, None, :]
        col += 1
    if key_padding_mask is not None:
        real = key_padding_mask[:, None, :]
        out = out * real[..., None]
        lse = torch.where(real, lse, torch.zeros_like(lse))
    out = out.to(q.dtype)
    if return_lse:
        return out, lse
    return out
