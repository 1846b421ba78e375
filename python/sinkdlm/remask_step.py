"""One batched remasking step of a masked-diffusion LM sampler.

A diffusion LM generates by looping: run the model on the partly masked sequence, pick which
masked positions to fill this step, fill them, repeat. :func:`remask_step` is the pick, fused
into one pass over the (B, L, V) logits per position; :func:`remask_step_reference` is the same
step written the way LLaDA's reference code writes it (float64 softmax, gather, mask, top-k).

Randomness (Gumbel noise when ``temperature > 0``, the ``"random"`` strategy) comes from a
counter-based RNG (Philox4x32-10): the noise is a pure function of ``(seed, offset, b, l, v)``
(see ``csrc/remask/philox.h``), so a run is reproducible and a reference can rebuild it with
:func:`remask_step_noise`. The 64-bit ``seed`` is drawn from ``generator`` by
:func:`remask_step_seed` (one ``torch.randint`` over the int64 range); ``offset`` is 0.
"""

from __future__ import annotations

import torch

STRATEGIES = ("low_confidence", "margin", "entropy", "random")


def remask_step_seed(generator: torch.Generator | None = None) -> int:
    """Draw the 64-bit Philox seed of one step from ``generator``.

    One ``torch.randint(-2**63, 2**63 - 1, ())`` on the generator's device (the default CPU
    generator when ``generator`` is None, so ``torch.manual_seed`` makes runs reproducible).
    Returns a Python int.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    value = torch.randint(
        -(2**63), 2**63 - 1, (), dtype=torch.int64, generator=generator, device=device
    )
    return int(value)


def remask_step_noise(
    seed: int, offset: int, batch: int, length: int, vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise :func:`remask_step` uses for a given ``seed`` and ``offset``, on the CPU.

    Returns ``gumbel`` float32 (batch, length, vocab): the Gumbel noise added to
    ``logits / temperature`` (as ``float(logit) * float32(1 / temperature) + gumbel``, rounded in
    that order), and ``uniform`` float32 (batch, length): the confidence of the ``"random"``
    strategy. Entry (b, l, v) depends only on (seed, offset, b, l, v), not on the shape.
    """
    return torch.ops.sinkdlm.remask_step_noise(int(seed), int(offset), batch, length, vocab)


def _needs_noise(strategy: str, temperature: float) -> bool:
    return temperature > 0 or strategy == "random"


def _as_num_transfer(num_transfer, batch: int, device: torch.device) -> torch.Tensor:
    if isinstance(num_transfer, int):
        return torch.full((batch,), num_transfer, dtype=torch.int64, device=device)
    return num_transfer


def remask_step(
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
    """Fill the most confident masked positions of each row (fused kernel, CPU and CUDA).

    Args:
        logits: (B, L, V) float32, float16 or bfloat16; the vocabulary dimension is read
            contiguously (copied if it is strided).
        x: (B, L) int64 current tokens; ``x == mask_id`` marks masked positions.
        mask_id: the mask token id, in [0, V).
        num_transfer: (B,) int64 (or an int for every row), >= 0: how many masked positions row b
            fills this step (capped at the number it has). Not used with ``threshold``, unless
            ``count_floor``.
        strategy: confidence of a masked position, from ``softmax(logits)`` without temperature
            or noise (LLaDA's convention; for Dream's tempered one pass ``logits / T``):
            ``"low_confidence"`` probability of the chosen token (Dream: maskgit_plus),
            ``"margin"`` top-1 minus top-2 probability (Dream: topk_margin), ``"entropy"``
            negative entropy, ``"random"`` uniform in (0, 1).
        temperature: 0 picks the argmax token; T > 0 the argmax of ``logits / T`` plus Gumbel
            noise (a sample from ``softmax(logits / T)``).
        threshold: if given, Fast-dLLM's parallel decoding: row b fills its most confident
            masked position plus every other whose confidence is >= threshold (both rounded to
            float32), whatever
            ``num_transfer`` says (Fast-dLLM's ``get_transfer_index`` with
            ``num_transfer_tokens=None``).
        count_floor: with ``threshold``, the hybrid rule: row b fills its
            ``max(num_transfer[b], 1)`` most confident masked positions plus every other at
            least ``threshold`` confident, so a schedule still bounds the number of steps.
        window: optional (B, 2) int64 ``[start, end)`` per row, 0 <= start <= end <= L: only
            positions inside may be filled (semi-autoregressive blocks).
        position_offset: ``logits`` and ``x`` hold positions ``position_offset ..
            position_offset + L - 1`` of longer sequences (one block of them); the noise of
            position l is drawn at ``position_offset + l``, so a step over a block picks what the
            step over the whole sequences with ``window`` on that block would. >= 0.
        generator: source of the Philox seed (see :func:`remask_step_seed`); drawn only when
            noise is needed (temperature > 0 or strategy "random").

    Returns:
        ``x_new`` (B, L) int64: x with the picked positions filled; ``transferred`` (B, L) bool:
        the picked positions; ``confidence`` (B, L) float32: the confidence of every masked
        position in its window, -inf elsewhere. Ranking ties go to the lower position, argmax ties
        to the lower token id.
    """
    seed = remask_step_seed(generator) if _needs_noise(strategy, temperature) else 0
    num_transfer = _as_num_transfer(num_transfer, logits.shape[0], logits.device)
    return torch.ops.sinkdlm.remask_step(
        logits,
        x,
        int(mask_id),
        num_transfer,
        window,
        strategy,
        float(temperature),
        None if threshold is None else float(threshold),
        bool(count_floor),
        seed,
        0,
        int(position_offset),
    )


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
    """Plain-PyTorch :func:`remask_step` (same arguments, outputs and noise), written as LLaDA's
    reference sampler does it: noisy argmax, float64 softmax over the vocabulary, gather, mask
    out non-eligible positions, per-row top-k (a stable sort, so ties go to the lower position).
    """
    if strategy not in STRATEGIES:
        raise ValueError(
            f"remask_step_reference: strategy must be one of {STRATEGIES}, got {strategy!r}"
        )
    batch, length, vocab = logits.shape
    device = logits.device
    num_transfer = _as_num_transfer(num_transfer, batch, device)
    gumbel = uniform = None
    if _needs_noise(strategy, temperature):
        seed = remask_step_seed(generator)
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

    probs = torch.softmax(logits.double(), dim=-1)
    if strategy == "low_confidence":
        confidence = torch.gather(probs, -1, candidate.unsqueeze(-1)).squeeze(-1)
    elif strategy == "margin":
        top = probs.topk(min(2, vocab), dim=-1).values
        confidence = top[..., 0] - (top[..., 1] if vocab > 1 else 0.0)
    elif strategy == "entropy":
        confidence = torch.special.xlogy(probs, probs).sum(dim=-1)
    else:
        confidence = uniform.double()

    positions = torch.arange(length, device=device)
    eligible = x == mask_id
    if window is not None:
        eligible &= (positions >= window[:, :1]) & (positions < window[:, 1:])
    confidence = torch.where(eligible, confidence, float("-inf"))

    order = torch.sort(confidence, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, positions.expand(batch, length).contiguous())
    num_eligible = eligible.sum(dim=1)
    if count_floor and threshold is None:
        raise ValueError("remask_step_reference: count_floor needs a threshold, got None")
    if threshold is None:
        count = num_transfer
    elif count_floor:
        count = num_transfer.clamp_min(1)
    else:
        count = torch.ones_like(num_transfer)
    count = torch.minimum(count, num_eligible)
    transferred = eligible & (rank < count.unsqueeze(1))
    if threshold is not None:  # compared in float32, as the kernels do
        threshold32 = torch.tensor(threshold, dtype=torch.float32, device=device)
        transferred |= eligible & (confidence.float() >= threshold32)
    x_new = torch.where(transferred, candidate, x)
    return x_new, transferred, confidence.float()


@torch.library.register_fake("sinkdlm::remask_step")
def _remask_step_fake(
    logits,
    x,
    mask_id,
    num_transfer,
    window,
    strategy,
    temperature,
    threshold,
    count_floor,
    seed,
    offset,
    position_offset,
):
    shape = x.shape
    return (
        x.new_empty(shape),
        x.new_empty(shape, dtype=torch.bool),
        x.new_empty(shape, dtype=torch.float32),
    )


@torch.library.register_fake("sinkdlm::remask_step_noise")
def _remask_step_noise_fake(seed, offset, batch, length, vocab):
    return torch.empty(batch, length, vocab), torch.empty(batch, length)
