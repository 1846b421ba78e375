"""Masked-diffusion sampler (LLaDA / Dream style) built on :func:`sinkdlm.remask_step`."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from . import _checks
from .ops import remask_step
from .protocol import inference_cache


def _check_schedule_args(fn: str, num_masked, steps) -> int:
    if not isinstance(num_masked, torch.Tensor) or num_masked.dtype != torch.int64:
        _checks.fail(
            fn, "num_masked", "an int64 (B,) tensor", _checks.describe(num_masked), TypeError
        )
    if num_masked.dim() != 1:
        _checks.fail(fn, "num_masked", "(B,)", f"shape {tuple(num_masked.shape)}")
    return _checks.integer(fn, "steps", steps, minimum=1)


def llada_transfer_schedule(num_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's schedule: spread each row's masked count over ``steps`` as evenly as possible,
    the earlier steps taking the remainder.

    Args: num_masked (B,) int64; steps >= 1. Returns (B, steps) int64 counts summing to num_masked.
    """
    steps = _check_schedule_args("llada_transfer_schedule", num_masked, steps)
    base = num_masked // steps
    remainder = num_masked % steps
    step_index = torch.arange(steps, device=num_masked.device)
    return base.unsqueeze(1) + (step_index < remainder.unsqueeze(1)).to(num_masked.dtype)


def dream_transfer_schedule(
    num_masked: torch.Tensor, steps: int, eps: float = 1e-3
) -> torch.Tensor:
    """Dream's schedule: timesteps ``linspace(1, eps, steps + 1)`` (float32); the step from t to s
    fills ``int(n · (1 - s / t))`` of the n positions still masked, and the last step the rest.

    Args: num_masked (B,) int64; steps >= 1; 0 < eps < 1 (the last timestep). Returns (B, steps)
    int64 counts summing to num_masked, each >= 0.
    """
    steps = _check_schedule_args("dream_transfer_schedule", num_masked, steps)
    eps = _checks.real("dream_transfer_schedule", "eps", eps, 0, 1, low_open=True, high_open=True)
    timesteps = torch.linspace(1.0, eps, steps + 1, dtype=torch.float32)
    remaining = num_masked.clone()
    counts = []
    for i in range(steps):
        if i == steps - 1:
            count = remaining
        else:
            fraction = 1.0 - timesteps[i + 1] / timesteps[i]
            count = (remaining.to(torch.float32) * fraction.to(remaining.device)).to(torch.int64)
        counts.append(count)
        remaining = remaining - count
    return torch.stack(counts, dim=1)


def _check_generate_args(
    model, input_ids, attention_mask, gen_length, steps, block_length, mask_id
) -> int:
    """Types and ranges generate's loop relies on; returns mask_id as an int. Where the model
    declares its vocabulary (``model.config.vocab_size``), mask_id and the prompt's ids must lie
    in it (else the model's embedding fails with a bare index error)."""
    if not callable(model):
        _checks.fail("generate", "model", "a callable returning logits", _checks.describe(model))
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype != torch.int64:
        _checks.fail(
            "generate", "input_ids", "a (B, P) int64 tensor", _checks.describe(input_ids), TypeError
        )
    if input_ids.dim() != 2:
        _checks.fail("generate", "input_ids", "(B, P)", f"shape {tuple(input_ids.shape)}")
    vocab_size = _checks.vocab_size_of(model)
    _checks.token_ids("generate", "input_ids", input_ids, vocab_size)
    if attention_mask is not None and (
        not isinstance(attention_mask, torch.Tensor) or attention_mask.is_floating_point()
    ):
        _checks.fail(
            "generate",
            "attention_mask",
            "a bool or 0/1 integer tensor",
            _checks.describe(attention_mask),
            TypeError,
        )
    for name, value in (("gen_length", gen_length), ("steps", steps)):
        _checks.integer("generate", name, value)
    if block_length is not None:
        _checks.integer("generate", "block_length", block_length)
    return _checks.mask_id("generate", mask_id, vocab_size)


def _model_logits(model, tokens, attention_mask):
    out = model(tokens) if attention_mask is None else model(tokens, attention_mask=attention_mask)
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    gen_length: int,
    steps: int,
    block_length: int | None = None,
    strategy: str = "low_confidence",
    temperature: float = 0.0,
    threshold: float | None = None,
    cfg_scale: float = 0.0,
    mask_id: int,
    logits_shift: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
    schedule: str = "llada",
    eps: float = 1e-3,
) -> torch.Tensor:
    """Generate ``gen_length`` tokens after each prompt by iterative unmasking.

    Args:
        model: callable ``model(tokens)`` or, with ``attention_mask``,
            ``model(tokens, attention_mask=mask)`` returning (B, T, V) logits or an object with
            ``.logits`` (a Hugging Face model).
        input_ids: (B, P) int64 prompts, left-padded to a common length P.
        attention_mask: optional (B, P), 1/True for real prompt tokens; extended with ones over
            the generated part and passed to the model.
        gen_length: tokens to generate; a multiple of ``block_length`` (default: gen_length).
        steps: total denoising steps, a multiple of the number of blocks; blocks are filled left
            to right, ``steps / blocks`` steps each.
        strategy, temperature, threshold: as in :func:`sinkdlm.remask_step`. With ``threshold``
            each step fills every position at least that confident and at least the schedule's
            count, and a block stops as soon as it has no mask left (``steps`` is an upper bound).
        cfg_scale: classifier-free guidance as in LLaDA (unconditional pass with the prompt
            masked; logits = uncond + (cfg_scale + 1) (cond - uncond)); 0 disables it.
        mask_id: the mask token id.
        logits_shift: True for models that predict token i at position i - 1 (Dream).
        generator: torch.Generator for the sampling noise (see :func:`sinkdlm.remask_step_seed`).
        progress: show a tqdm bar over steps.
        schedule: ``"llada"`` (:func:`llada_transfer_schedule`) or ``"dream"``
            (:func:`dream_transfer_schedule`, with ``eps``), applied within each block.
        eps: Dream's last timestep, 0 < eps < 1.

    Returns:
        (B, P + gen_length) int64: the prompts followed by the generated tokens.

    When the model carries a sink token (``sinkdlm.hf.has_sink_token``), its K/V are computed
    once for the whole call (``sinkdlm.hf.sink_kv_cache``, entered through
    ``sinkdlm.protocol.inference_cache``), not once per step.
    """
    mask_id = _check_generate_args(
        model, input_ids, attention_mask, gen_length, steps, block_length, mask_id
    )
    _checks.real("generate", "cfg_scale", cfg_scale, low=0)
    _checks.real("generate", "eps", eps, 0, 1, low_open=True, high_open=True)
    _checks.generator("generate", generator)
    block_length = gen_length if block_length is None else block_length
    if gen_length <= 0 or block_length <= 0 or gen_length % block_length:
        raise ValueError(
            f"generate: gen_length ({gen_length}) must be a positive multiple of block_length "
            f"({block_length})"
        )
    num_blocks = gen_length // block_length
    if steps <= 0 or steps % num_blocks:
        raise ValueError(
            f"generate: steps ({steps}) must be a positive multiple of the number of blocks "
            f"({num_blocks} = gen_length / block_length)"
        )
    if schedule not in ("llada", "dream"):
        raise ValueError(f"generate: schedule must be 'llada' or 'dream', got {schedule!r}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"generate: attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got "
            f"{tuple(attention_mask.shape)}"
        )
    steps_per_block = steps // num_blocks
    batch, prompt_length = input_ids.shape
    device = input_ids.device

    x = torch.full((batch, prompt_length + gen_length), mask_id, dtype=torch.int64, device=device)
    x[:, :prompt_length] = input_ids
    full_mask = None
    prompt_positions = torch.zeros_like(x, dtype=torch.bool)
    if attention_mask is None:
        prompt_positions[:, :prompt_length] = True
    else:
        full_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, gen_length)], dim=1)
        prompt_positions[:, :prompt_length] = attention_mask.bool()

    def logits_of(tokens):
        if cfg_scale > 0:
            unconditional = tokens.masked_fill(prompt_positions, mask_id)
            mask = None if full_mask is None else torch.cat([full_mask, full_mask])
            both = _model_logits(model, torch.cat([tokens, unconditional]), mask)
            conditional, unconditional_logits = both.chunk(2)
            logits = unconditional_logits + (cfg_scale + 1) * (conditional - unconditional_logits)
        else:
            logits = _model_logits(model, tokens, full_mask)
        if logits_shift:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits

    window = torch.empty(batch, 2, dtype=torch.int64, device=device)
    with inference_cache(model), tqdm(total=steps, disable=not progress, desc="denoising") as bar:
        for block in range(num_blocks):
            start = prompt_length + block * block_length
            end = start + block_length
            window[:, 0], window[:, 1] = start, end
            num_masked = (x[:, start:end] == mask_id).sum(dim=1)
            if schedule == "llada":
                counts = llada_transfer_schedule(num_masked, steps_per_block)
            else:
                counts = dream_transfer_schedule(num_masked, steps_per_block, eps)
            for i in range(steps_per_block):
                if threshold is not None and not (x[:, start:end] == mask_id).any():
                    bar.update(steps_per_block - i)
                    break
                x, _, _ = remask_step(
                    logits_of(x),
                    x,
                    mask_id,
                    counts[:, i],
                    strategy=strategy,
                    temperature=temperature,
                    threshold=threshold,
                    window=window,
                    generator=generator,
                )
                bar.update(1)
    return x
