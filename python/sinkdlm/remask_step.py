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

from . import _checks

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


def _check_step_args(
    fn, logits, x, mask_id, num_transfer, temperature, threshold, window, generator
):
    """What the op cannot check itself (Python types) or not everywhere (devices: a meta
    logits tensor would send a CPU x to the fake kernel). Returns mask_id, num_transfer (B,)
    int64, temperature and threshold as the op takes them; shapes, dtypes and values of the
    tensors are the op's to check."""
    for name, t in (("logits", logits), ("x", x)):
        if not isinstance(t, torch.Tensor):
            _checks.fail(fn, name, "a torch.Tensor", _checks.describe(t), TypeError)
    if logits.dim() != 3:
        _checks.fail(fn, "logits", "(B, L, V)", f"shape {tuple(logits.shape)}")
    batch, _, vocab = logits.shape
    mask_id = _checks.integer(fn, "mask_id", mask_id, 0, vocab - 1)
    if not isinstance(num_transfer, torch.Tensor):
        expected = "an int or a (B,) int64 tensor"
        count = _checks.integer(fn, "num_transfer", num_transfer, 0, expected=expected)
        num_transfer = torch.full((batch,), count, dtype=torch.int64, device=logits.device)
    for name, t in (("x", x), ("num_transfer", num_transfer), ("window", window)):
        if t is not None and not isinstance(t, torch.Tensor):
            _checks.fail(fn, name, "a torch.Tensor", _checks.describe(t), TypeError)
        if t is not None and t.device != logits.device:
            _checks.fail(fn, name, f"on the logits' device {logits.device}", t.device)
    temperature = _checks.real(fn, "temperature", temperature, low=0)
    if threshold is not None:
        threshold = _checks.real(fn, "threshold", threshold, allow_infinite=True)
    _checks.generator(fn, generator)
    return mask_id, num_transfer, temperature, threshold


def remask_step(
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
    """Fill the most confident masked positions of each row (fused kernel, CPU and CUDA).

    Args:
        logits: (B, L, V) float32, float16 or bfloat16; the vocabulary dimension is read
            contiguously (copied if it is strided).
        x: (B, L) int64 current tokens; ``x == mask_id`` marks masked positions.
        mask_id: the mask token id, in [0, V).
        num_transfer: (B,) int64 (or an int for every row), >= 0: how many masked positions row b
            fills this step (capped at the number it has). With ``threshold``, the least number.
        strategy: confidence of a masked position, from ``softmax(logits)`` without temperature
            or noise (LLaDA's convention; for Dream's tempered one pass ``logits / T``):
            ``"low_confidence"`` probability of the chosen token (Dream: maskgit_plus),
            ``"margin"`` top-1 minus top-2 probability (Dream: topk_margin), ``"entropy"``
            negative entropy, ``"random"`` uniform in (0, 1).
        temperature: 0 picks the argmax token; T > 0 the argmax of ``logits / T`` plus Gumbel
            noise (a sample from ``softmax(logits / T)``).
        threshold: if given, row b fills its ``max(num_transfer[b], 1)`` most confident masked
            positions plus every other whose confidence is >= threshold (Fast-dLLM's parallel
            decoding with ``num_transfer = 0``: the best one plus all confident ones).
        window: optional (B, 2) int64 ``[start, end)`` per row, 0 <= start <= end <= L: only
            positions inside may be filled (semi-autoregressive blocks).
        generator: source of the Philox seed (see :func:`remask_step_seed`); drawn only when
            noise is needed (temperature > 0 or strategy "random").

    Returns:
        ``x_new`` (B, L) int64: x with the picked positions filled; ``transferred`` (B, L) bool:
        the picked positions; ``confidence`` (B, L) float32: the confidence of every masked
        position in its window, -inf elsewhere. Ranking ties go to the lower position, argmax ties
        to the lower token id.
    """
    mask_id, num_transfer, temperature, threshold = _check_step_args(
        "remask_step", logits, x, mask_id, num_transfer, temperature, threshold, window, generator
    )
    seed = remask_step_seed(generator) if _needs_noise(strategy, temperature) else 0
    return torch.ops.sinkdlm.remask_step(
        logits, x, mask_id, num_transfer, window, strategy, temperature, threshold, seed, 0
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
    window: torch.Tensor | None = None,
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
    fn = "remask_step_reference"
    mask_id, num_transfer, temperature, threshold = _check_step_args(
        fn, logits, x, mask_id, num_transfer, temperature, threshold, window, generator
    )
    batch, length, vocab = logits.shape
    device = logits.device
    gumbel = uniform = None
    if _needs_noise(strategy, temperature):
        gumbel, uniform = remask_step_noise(remask_step_seed(generator), 0, batch, length, vocab)
        gumbel, uniform = gumbel.to(device), uniform.to(device)

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
    count = torch.minimum(num_transfer, num_eligible)
    if threshold is not None:
        count = torch.where(num_eligible > 0, count.clamp_min(1), 0)
    transferred = eligible & (rank < count.unsqueeze(1))
    if threshold is not None:
        transferred |= eligible & (confidence >= threshold)
    x_new = torch.where(transferred, candidate, x)
    return x_new, transferred, confidence.float()


@torch.library.register_fake("sinkdlm::remask_step")
def _remask_step_fake(
    logits, x, mask_id, num_transfer, window, strategy, temperature, threshold, seed, offset
):
    for name, t in (("x", x), ("num_transfer", num_transfer), ("window", window)):
        if t is not None and t.device != logits.device:
            raise ValueError(
                f"remask_step: {name} must be on the logits' device {logits.device}, got {t.device}"
            )
    shape = x.shape
    return (
        x.new_empty(shape),
        x.new_empty(shape, dtype=torch.bool),
        x.new_empty(shape, dtype=torch.float32),
    )


@torch.library.register_fake("sinkdlm::remask_step_noise")
def _remask_step_noise_fake(seed, offset, batch, length, vocab):
    return torch.empty(batch, length, vocab), torch.empty(batch, length)


def _remask_step_backward(ctx, *grads):
    raise NotImplementedError(
        "remask_step is not differentiable: its confidence ranks positions and is not meant to "
        "carry gradients; compute it from detached logits (or under torch.no_grad())"
    )


# Without an autograd kernel, PyTorch would backpropagate zeros through the confidence with only
# a warning; this makes that an error.
torch.library.register_autograd("sinkdlm::remask_step", _remask_step_backward)
