"""The noise of the remasking step: a counter-based RNG (Philox4x32-10, csrc/remask/philox.h).

Gumbel noise (``temperature > 0``) and the ``"random"`` strategy's confidence are a pure function
of ``(seed, offset, b, l, v)``, so a run is reproducible and a reference can rebuild the noise a
kernel used. The 64-bit ``seed`` of a step is drawn from a ``torch.Generator``.
"""

from __future__ import annotations

import torch


def needs_noise(strategy: str, temperature: float) -> bool:
    """Whether a step with these options reads the noise (and so draws a seed)."""
    return temperature > 0 or strategy == "random"


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
    """The noise :func:`sinkdlm.remask_step` uses for a given ``seed`` and ``offset``, on the CPU.

    Returns ``gumbel`` float32 (batch, length, vocab): the Gumbel noise added to
    ``logits / temperature`` (as ``float(logit) * float32(1 / temperature) + gumbel``, rounded in
    that order), and ``uniform`` float32 (batch, length): the confidence of the ``"random"``
    strategy. Entry (b, l, v) depends only on (seed, offset, b, l, v), not on the shape.
    """
    return torch.ops.sinkdlm.remask_step_noise(int(seed), int(offset), batch, length, vocab)


@torch.library.register_fake("sinkdlm::remask_step_noise")
def _remask_step_noise_fake(seed, offset, batch, length, vocab):
    return torch.empty(batch, length, vocab), torch.empty(batch, length)
