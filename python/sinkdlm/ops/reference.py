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
from .common import accumulation_dtype, expand_sink, softmax_scale
from .remask_noise import needs_noise, remask_step_noise, remask_step_seed

__all__ = [
    "attention_mass_reference",
    "remask_step_reference",
    "sink_attention_mask",
    "sink_attention_reference",
]


# ---- sink attention ---------------------------------------------------------------------------


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
    the result. Same arguments, shapes and return values as :func:`sinkdlm.sink_attention`.
    Computes in the inputs' dtype: pass float64 tensors for a reference.
    """
    check_sink_attention_args(q, k, v, sink_k, sink_v, sink_logit, key_padding_mask, scale)
    L = q.shape[2]
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
    )
    return (out, lse) if return_lse else out


def dense_sink_attention(
    q, k, v, sink_k, sink_v, sink_logit, key_padding_mask, scale: float, sink_position: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The core of :func:`sink_attention_reference` on checked arguments, ``scale`` resolved:
    returns ``(out, lse)``."""
    B, H, L, D = q.shape
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
    window: torch.Tensor | None = None,
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
    mask_id, num_transfer, temperature, threshold = normalize_remask_step_args(
        fn, logits, x, mask_id, num_transfer, window, temperature, threshold, generator
    )
    seed = remask_step_seed(generator) if needs_noise(strategy, temperature) else 0
    return dense_remask_step(
        logits, x, mask_id, num_transfer, window, strategy, temperature, threshold, seed
    )


def dense_remask_step(
    logits, x, mask_id, num_transfer, window, strategy, temperature, threshold, seed
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The core of :func:`remask_step_reference` on checked arguments: ``num_transfer`` a (B,)
    tensor, the noise rebuilt from ``seed`` (offset 0) where the step needs it."""
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
        gumbel, uniform = remask_step_noise(seed, 0, batch, length, vocab)
        gumbel, uniform = gumbel.to(device), uniform.to(device)

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
    count = torch.minimum(num_transfer, num_eligible)
    if threshold is not None:
        count = torch.where(num_eligible > 0, count.clamp_min(1), 0)
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
