"""Plain-PyTorch references of the operators, written the literal way, for tests.

``sink_attention_reference`` inserts a real sink token and uses the paper's dense mask
(:func:`sink_attention_mask`); ``remask_step_reference`` is LLaDA's sampler step (float64
softmax, gather, mask, top-k); ``attention_mass_reference`` materialises the softmax matrix.
They compute in the inputs' dtype (pass float64 for a reference) and take O(L^2) memory.

The public references check their arguments. Their unchecked cores, :func:`dense_sink_attention`
and :func:`dense_remask_step`, are also what ``sink_attention`` (for a logit sink or the lse) and
``remask_step`` run on devices without a native kernel, after their own checks.
"""

from __future__ import annotations

import torch

from .checks import STRATEGIES, check_sink_attention_args, normalize_remask_step_args
from .common import accumulation_dtype, expand_sink, query_padding_in_force, softmax_scale
from .remask_noise import needs_noise, remask_step_noise, remask_step_seed

__all__ = [
    "attention_mass_reference",
    "remask_step_reference",
    "sink_attention_mask",
    "sink_attention_reference",
]


# ---- sink attention ---------------------------------------------------------------------------


def sink_attention_mask(
    L: int,
    sink_position: int = 0,
    key_padding_mask: torch.Tensor | None = None,
    *,
    query_length: int | None = None,
) -> torch.Tensor:
    """Dense mask of the paper's form for a sequence with a sink token inserted.

    The keys are ``L + 1`` tokens with the sink at index ``sink_position``
    (``0 <= sink_position <= L``). By default the queries are those same tokens: the sink's
    row sees only itself; every other row sees the sink and every real token. With
    ``query_length`` the queries are ``query_length`` other tokens, none of them the sink (a
    block's queries over cached keys plus their own): each row sees the sink and every real key.

    Args:
        L: number of real tokens among the keys.
        sink_position: where the sink sits in the ``L + 1`` keys.
        key_padding_mask: optional bool ``(B, L)``, True = real token, for the real keys.
            Padded rows still see the sink, so no row is fully masked.
        query_length: None (the queries are the keys), or the number Lq of separate queries.

    Returns:
        bool ``(L + 1, L + 1)`` (``(Lq, L + 1)`` with ``query_length``), with a ``B`` dimension
        first when a padding mask is given; True = may attend. Use it as ``attn_mask=mask`` (or
        ``mask[:, None]``) in ``F.scaled_dot_product_attention``.
    """
    if not 0 <= sink_position <= L:
        raise ValueError(
            f"sink_attention_mask: sink_position must be in [0, {L}], got {sink_position}"
        )
    if query_length is not None and not (isinstance(query_length, int) and query_length >= 0):
        raise ValueError(
            f"sink_attention_mask: query_length must be None or an int >= 0, got {query_length!r}"
        )
    device = key_padding_mask.device if key_padding_mask is not None else None
    n = L + 1
    if query_length is None:
        mask = torch.ones(n, n, dtype=torch.bool, device=device)
        mask[sink_position, :] = False
        mask[sink_position, sink_position] = True
    else:
        mask = torch.ones(query_length, n, dtype=torch.bool, device=device)
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
    query_padding_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    sink_position: int = 0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``sink_attention`` written the paper's way, in plain PyTorch (O(Lq Lk) memory).

    A real sink token is inserted into the keys at ``sink_position`` and attention runs with
    the dense mask of :func:`sink_attention_mask`. When Lq == Lk the queries are the same
    sequence, sink included, and the sink's own row is dropped from the result; otherwise they
    are separate queries (``query_length=Lq``). With ``segment_ids`` the mask also keeps each
    token to its own segment (the sink stays visible to all). Same arguments, shapes and return
    values as :func:`sinkdlm.sink_attention`. Computes in the inputs' dtype: pass float64
    tensors for a reference.
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
    L = k.shape[2]
    if sink_k is not None and not 0 <= sink_position <= L:
        raise ValueError(
            f"sink_attention_reference: sink_position must be in [0, {L}], got {sink_position}"
        )
    out, lse = dense_sink_attention(
        q,
        k,
        v,
        sink_k,
        sink_v,
        sink_logit,
        key_padding_mask,
        softmax_scale(scale, q.shape[-1]),
        sink_position,
        query_padding_mask,
        segment_ids,
    )
    return (out, lse) if return_lse else out


def dense_sink_attention(
    q,
    k,
    v,
    sink_k,
    sink_v,
    sink_logit,
    key_padding_mask,
    scale: float,
    sink_position: int = 0,
    query_padding_mask=None,
    segment_ids=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The core of :func:`sink_attention_reference` on checked arguments, ``scale`` resolved:
    returns ``(out, lse)``."""
    B, H, Lq, D = q.shape
    L = k.shape[2]
    same_tokens = Lq == L
    query_padding_mask = query_padding_in_force(q, k, key_padding_mask, query_padding_mask)
    # (B, L, L): query i and key j in the same segment (Lq == Lk with segments).
    same_segment = None if segment_ids is None else segment_ids[:, :, None] == segment_ids[:, None]
    group = H // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    has_token = sink_k is not None
    if has_token:
        sk = expand_sink(sink_k, B).repeat_interleave(group, dim=1).unsqueeze(2)
        sv = expand_sink(sink_v, B).repeat_interleave(group, dim=1).unsqueeze(2)
        p = sink_position

        def insert(x, token):
            return torch.cat([x[:, :, :p], token, x[:, :, p:]], dim=2)

        # The sink's query is irrelevant (its row sees only itself): reuse its key.
        if same_tokens:
            q = insert(q, sk)
        k, v = insert(k, sk), insert(v, sv)
        mask = sink_attention_mask(L, p, key_padding_mask, query_length=None if same_tokens else Lq)
        if same_segment is not None:  # the sink's row and column stay as they are
            tokens = torch.tensor([i for i in range(L + 1) if i != p], dtype=torch.long)
            segments = torch.ones(B, L + 1, L + 1, dtype=torch.bool, device=q.device)
            segments[:, tokens[:, None], tokens] = same_segment
            mask = mask & segments
    elif key_padding_mask is not None or same_segment is not None:
        mask = torch.ones(B, Lq, L, dtype=torch.bool, device=q.device)
        if key_padding_mask is not None:
            mask = mask & key_padding_mask[:, None, :]
        if same_segment is not None:
            mask = mask & same_segment
    else:
        mask = None
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    blind = None  # rows that see no key at all (no sink token, every key padded)
    if mask is not None:
        mask = mask if mask.dim() == 3 else mask.unsqueeze(0)
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        # Such a row is zeroed below; finite scores keep the NaN of an all -inf softmax out of
        # the gradients.
        seen = mask.any(-1)
        scores = scores.masked_fill(~seen[:, None, :, None], 0.0)
        if not has_token and sink_logit is None:  # a sink (token or logit) is always seen
            blind = ~seen
    if sink_logit is not None:
        logit = sink_logit.to(scores.dtype).view(1, H, 1, 1).expand(B, H, scores.shape[2], 1)
        scores = torch.cat([scores, logit], dim=-1)
        v = torch.cat([v, v.new_zeros(B, H, 1, D)], dim=2)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    if has_token and same_tokens:
        keep = [i for i in range(L + 1) if i != sink_position]
        out, lse = out[:, :, keep], lse[:, :, keep]
    # Padded query rows, and rows that see no key at all, return 0 (and lse 0).
    empty = torch.zeros_like(lse, dtype=torch.bool)
    if blind is not None:
        empty = empty | blind[:, None, :]
    if query_padding_mask is not None:
        empty = empty | ~query_padding_mask[:, None, :]
    out = out.masked_fill(empty[..., None], 0)
    lse = lse.masked_fill(empty, 0)
    return out.contiguous(), lse.to(accumulation_dtype(q.dtype))


# ---- remasking step ---------------------------------------------------------------------------


def remask_step_reference(
    logits: torch.Tensor,
    x: torch.Tensor,
    mask_id: int,
    num_transfer: torch.Tensor | int,
    *,
    strategy: str = "low_confidence",
    temperature: float = 0.0,
    threshold: float | None = None,
    count_floor: bool = False,
    window: torch.Tensor | None = None,
    position_offset: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-PyTorch :func:`sinkdlm.remask_step` (same arguments, outputs and noise), written as
    LLaDA's reference sampler does it: noisy argmax, float64 softmax over the vocabulary, gather,
    mask out non-eligible positions, per-row top-k (a stable sort, so ties go to the lower
    position).
    """
    if strategy not in STRATEGIES:
        raise ValueError(
            f"remask_step_reference: strategy must be one of {STRATEGIES}, got {strategy!r}"
        )
    fn = "remask_step_reference"
    args = normalize_remask_step_args(
        fn,
        logits,
        x,
        mask_id,
        num_transfer,
        window,
        temperature,
        threshold,
        generator,
        count_floor,
        position_offset,
    )
    mask_id, num_transfer, temperature, threshold, count_floor, position_offset = args
    if count_floor and threshold is None:
        raise ValueError(f"{fn}: count_floor needs a threshold, got None")
    seed = remask_step_seed(generator) if needs_noise(strategy, temperature) else 0
    return dense_remask_step(
        logits,
        x,
        mask_id,
        num_transfer,
        window,
        strategy,
        temperature,
        (threshold, count_floor),
        seed,
        position_offset,
    )


def dense_remask_step(
    logits, x, mask_id, num_transfer, window, strategy, temperature, rule, seed, position_offset
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The core of :func:`remask_step_reference` on checked arguments: ``num_transfer`` a (B,)
    tensor, ``rule`` = (threshold, count_floor), the noise rebuilt from ``seed`` (offset 0, at
    positions ``position_offset + l``) where the step needs it."""
    threshold, count_floor = rule
    batch, length, vocab = logits.shape
    device = logits.device
    positions = torch.arange(length, device=device)
    eligible = x == mask_id
    if window is not None:
        eligible &= (positions >= window[:, :1]) & (positions < window[:, 1:])
    # Non-finite logits, the kernels' rule: a NaN, or no entry above -inf, leaves a position's
    # distribution undefined (raise); +inf entries share all the probability.
    undefined = eligible & (logits.isnan().any(-1) | (logits == float("-inf")).all(-1))
    if undefined.any():
        b, pos = undefined.nonzero()[0].tolist()
        raise ValueError(
            "remask_step: logits must be free of NaN and have an entry above -inf at every "
            f"position to fill; position (b={b}, l={pos}) has a NaN or only -inf "
            f"({int(undefined.sum())} such positions)"
        )
    gumbel = uniform = None
    if needs_noise(strategy, temperature):
        gumbel, uniform = remask_step_noise(seed, 0, batch, position_offset + length, vocab)
        gumbel = gumbel[:, position_offset:].to(device)
        uniform = uniform[:, position_offset:].to(device)

    logits32 = logits.float()
    if temperature > 0:
        inv_temperature = torch.tensor(1.0 / temperature, dtype=torch.float32, device=device)
        scores = logits32 * inv_temperature + gumbel
    else:
        scores = logits32
    candidate = scores.argmax(dim=-1)

    logits64 = logits.double()
    infinite = logits64 == float("inf")
    n_inf = infinite.sum(dim=-1, keepdim=True)
    probs = torch.where(n_inf > 0, infinite / n_inf.clamp_min(1), torch.softmax(logits64, dim=-1))
    if strategy == "low_confidence":
        confidence = torch.gather(probs, -1, candidate.unsqueeze(-1)).squeeze(-1)
    elif strategy == "margin":
        top = probs.topk(min(2, vocab), dim=-1).values
        confidence = top[..., 0] - (top[..., 1] if vocab > 1 else 0.0)
    elif strategy == "entropy":
        confidence = torch.special.xlogy(probs, probs).sum(dim=-1)
    else:
        confidence = uniform.double()

    confidence = torch.where(eligible, confidence, float("-inf"))

    order = torch.sort(confidence, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, positions.expand(batch, length).contiguous())
    num_eligible = eligible.sum(dim=1)
    if threshold is None:
        count = num_transfer
    elif count_floor:
        count = num_transfer.clamp_min(1)
    else:  # Fast-dLLM: the most confident one, then whatever passes the threshold
        count = torch.ones_like(num_transfer)
    count = torch.minimum(count, num_eligible)
    transferred = eligible & (rank < count.unsqueeze(1))
    if threshold is not None:
        # In float32, as the kernels compare (their confidence is float32, the threshold too).
        threshold32 = torch.tensor(threshold, dtype=torch.float32, device=device)
        transferred |= eligible & (confidence.float() >= threshold32)
    x_new = torch.where(transferred, candidate, x)
    return x_new, transferred, confidence.float()


# ---- attention mass ---------------------------------------------------------------------------


def attention_mass_reference(
    q, k, sink_k=None, *, sink_logit=None, key_padding_mask=None, scale=None
):
    """Dense float64 reference: the full softmax matrix over [keys ; sink], then column means.

    Same arguments and results as :func:`sinkdlm.analysis.attention_mass` (without lse: it is
    computed here), float64. Materialises (B,H,L,L+2): for tests and small inputs only.
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
        sk = expand_sink(sink_k.double(), b).repeat_interleave(group, 1)
        extra.append(torch.einsum("bhid,bhd->bhi", q, sk)[..., None] * scale)
    if sink_logit is not None:
        extra.append(sink_logit.double().view(1, h, 1, 1).expand(b, h, n, 1))
    probs = torch.cat([scores, *extra], dim=-1).softmax(-1)
    probs = probs * real[:, None, :, None]
    count = real.sum(1).double().clamp_min(1)[:, None, None]
    mass = probs[..., :n].sum(2) / count
    sink_mass = probs[..., n:].sum((2, 3)) / count[..., 0]
    return mass, sink_mass
