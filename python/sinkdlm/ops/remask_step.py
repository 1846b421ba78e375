"""One batched remasking step of a masked-diffusion LM sampler.

A diffusion LM generates by looping: run the model on the partly masked sequence, pick which
masked positions to fill this step, fill them, repeat. :func:`remask_step` is the pick, fused
into one pass over the (B, L, V) logits per position (native CPU and CUDA kernels; LLaDA's
plain-PyTorch step on devices without one). ``sinkdlm.remask_step_reference`` (ops/reference.py)
is that step written the way LLaDA's reference code writes it (float64 softmax, gather, mask,
top-k).

Randomness (Gumbel noise when ``temperature > 0``, the ``"random"`` strategy) comes from a
counter-based RNG (ops/remask_noise.py): the noise is a pure function of ``(seed, offset, b, l,
v)``, so a run is reproducible and a reference can rebuild it with :func:`remask_step_noise`.
The 64-bit ``seed`` is drawn from ``generator`` by :func:`remask_step_seed`; ``offset`` is 0.
"""

from __future__ import annotations

import torch

from .checks import STRATEGIES, check_remask_step_args, normalize_remask_step_args
from .common import has_native_kernel
from .reference import dense_remask_step
from .remask_noise import needs_noise, remask_step_noise, remask_step_seed

__all__ = ["STRATEGIES", "remask_step", "remask_step_noise", "remask_step_seed"]

_OP = "sinkdlm::remask_step"


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
    """Fill the most confident masked positions of each row (one fused pass over the logits).

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

    Non-finite logits: ``-inf`` entries get probability 0; ``+inf`` entries share all the
    probability (n of them: 1/n each, so ``low_confidence`` is 1/n for the chosen token, which
    is the lowest-id one, ``margin`` 1 for n = 1 and 0 otherwise, ``entropy`` -log n). A position
    to fill whose logits hold a NaN, or only -inf, raises ValueError (its distribution is
    undefined); on CUDA that check reads one flag back (a sync).
    """
    mask_id, num_transfer, temperature, threshold = normalize_remask_step_args(
        "remask_step", logits, x, mask_id, num_transfer, window, temperature, threshold, generator
    )
    seed = remask_step_seed(generator) if needs_noise(strategy, temperature) else 0
    if has_native_kernel(_OP, logits.device.type):
        return torch.ops.sinkdlm.remask_step(
            logits, x, mask_id, num_transfer, window, strategy, temperature, threshold, seed, 0
        )
    return _remask_step_composite(
        logits, x, mask_id, num_transfer, window, strategy, temperature, threshold, seed
    )


def _remask_step_composite(
    logits, x, mask_id, num_transfer, window, strategy, temperature, threshold, seed
):
    """Devices without a native kernel: the op's checks, then LLaDA's step in plain PyTorch
    (float64 softmax, the same Philox noise): the native kernel's results, at its cost in
    memory and time."""
    check_remask_step_args(
        logits, x, mask_id, num_transfer, window, strategy, temperature, threshold
    )
    return dense_remask_step(
        logits, x, mask_id, num_transfer, window, strategy, temperature, threshold, seed
    )


@torch.library.register_fake(_OP)
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


def _remask_step_backward(ctx, *grads):
    raise NotImplementedError(
        "remask_step is not differentiable: its confidence ranks positions and is not meant to "
        "carry gradients; compute it from detached logits (or under torch.no_grad())"
    )


# Without an autograd kernel, PyTorch would backpropagate zeros through the confidence with only
# a warning; this makes that an error.
torch.library.register_autograd(_OP, _remask_step_backward)
