"""The training objective of masked diffusion language models (LLaDA / MDLM / SMDM), once.

:func:`masked_diffusion_loss` is what a training loop calls; :func:`masked_diffusion_terms` is the
same forward with the pieces an evaluation sums (sinkdlm.models.evaluate_masked_diffusion).
"""

import torch
import torch.nn.functional as F

from . import _checks
from .packing import segment_ids_from_position_ids


def _check_draw_args(
    fn, input_ids, eps, attention_mask, prompt_mask, generator, position_ids=None
) -> float:
    """input_ids a (B, L) integer tensor, the masks bool or 0/1 of its shape, position_ids an
    integer tensor of its shape, 0 < eps < 1 (else the noise level t leaves (0, 1] and the weight
    1/t changes the objective), the generator a torch.Generator; returns eps as a float."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        _checks.fail(fn, "input_ids", "a (B, L) tensor of token ids", _checks.describe(input_ids))
    _checks.token_ids(fn, "input_ids", input_ids, None)
    for name, mask in (("attention_mask", attention_mask), ("prompt_mask", prompt_mask)):
        if mask is None:
            continue
        if not isinstance(mask, torch.Tensor) or mask.is_floating_point():
            _checks.fail(
                fn, name, "a bool or 0/1 integer tensor", _checks.describe(mask), TypeError
            )
        if mask.shape != input_ids.shape:
            _checks.fail(fn, name, f"input_ids' shape {tuple(input_ids.shape)}", tuple(mask.shape))
    if position_ids is not None:
        if not isinstance(position_ids, torch.Tensor) or position_ids.dtype not in (
            torch.int32,
            torch.int64,
        ):
            _checks.fail(
                fn, "position_ids", "an int tensor", _checks.describe(position_ids), TypeError
            )
        if position_ids.shape != input_ids.shape:
            _checks.fail(
                fn,
                "position_ids",
                f"input_ids' shape {tuple(input_ids.shape)}",
                tuple(position_ids.shape),
            )
    _checks.generator(fn, generator)
    return _checks.real(fn, "eps", eps, 0, 1, low_open=True, high_open=True)


def _check_loss_args(
    fn, model, input_ids, mask_id, eps, attention_mask, prompt_mask, generator, position_ids
):
    """The draw's checks, and token ids and mask_id inside ``model.config.vocab_size`` where the
    model declares it (else its embedding fails with a bare index error); returns
    ``(mask_id, eps)`` as int and float."""
    eps = _check_draw_args(fn, input_ids, eps, attention_mask, prompt_mask, generator, position_ids)
    vocab_size = _checks.vocab_size_of(model)
    _checks.token_ids(fn, "input_ids", input_ids, vocab_size)
    return _checks.mask_id(fn, mask_id, vocab_size), eps


def _loss_eligible(input_ids, attention_mask, prompt_mask):
    """(B, L) bool: the tokens that may be masked and scored (real, not prompt)."""
    eligible = torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask is not None:
        eligible &= attention_mask.to(torch.bool)
    if prompt_mask is not None:
        eligible &= ~prompt_mask.to(torch.bool)
    return eligible


def _draw(eligible, eps, generator, position_ids=None):
    """masked (B, L) and t: (B, 1), or (B, L) per token for packed rows (each document's own)."""
    batch, length = eligible.shape
    device = eligible.device
    segments = None if position_ids is None else segment_ids_from_position_ids(position_ids)
    documents = 1 if segments is None or length == 0 else int(segments[:, -1].max()) + 1
    t = (1.0 - eps) * torch.rand(batch, documents, device=device, generator=generator) + eps
    if documents > 1:  # packed rows: each token takes its document's noise level
        t = t.gather(1, segments)
    masked = eligible & (torch.rand(batch, length, device=device, generator=generator) < t)
    return masked, t


def draw_masks(
    input_ids,
    *,
    eps=1e-3,
    attention_mask=None,
    prompt_mask=None,
    position_ids=None,
    generator=None,
):
    """The masking draw of the forward process.

    Per sequence a noise level t ~ U(eps, 1] (``(1 - eps) * U(0, 1) + eps``); each loss-eligible
    token is masked with probability t. Padding (attention_mask 0) and prompt tokens (prompt_mask
    True) are never eligible. Packed rows (``position_ids`` (B, L) restarting at each document,
    as transformers' DataCollatorWithFlattening makes them) draw one t per document. Random
    numbers come from ``generator`` (on input_ids' device), t first, so two models can be scored
    on identical draws; rows without restarts draw exactly as without ``position_ids``.

    Returns:
        ``masked`` bool (B, L) and ``t`` float32: (B, 1), or (B, L) (each token's document's t)
        when some row holds several documents.
    """
    eps = _check_draw_args(
        "draw_masks", input_ids, eps, attention_mask, prompt_mask, generator, position_ids
    )
    eligible = _loss_eligible(input_ids, attention_mask, prompt_mask)
    return _draw(eligible, eps, generator, position_ids)


def masked_diffusion_terms(
    model,
    input_ids,
    *,
    mask_id,
    attention_mask=None,
    prompt_mask=None,
    position_ids=None,
    model_kwargs=None,
    eps=1e-3,
    generator=None,
):
    """One noisy forward pass of the objective (see :func:`masked_diffusion_loss`) and its parts.

    Returns a dict: ``loss`` (the scalar float32 objective, differentiable), ``nll_sum`` (the
    1/t-weighted cross-entropy summed over the masked tokens, detached), ``n_masked`` and
    ``n_tokens`` (masked and loss-eligible token counts), and ``masked_logits`` (N, V) float32
    with their ``targets`` (N,) for the N masked positions.
    """
    fn = "masked_diffusion_terms"
    return _terms(
        fn,
        model,
        input_ids,
        mask_id,
        attention_mask,
        prompt_mask,
        eps,
        generator,
        position_ids,
        model_kwargs,
    )


def _terms(
    fn,
    model,
    input_ids,
    mask_id,
    attention_mask,
    prompt_mask,
    eps,
    generator,
    position_ids=None,
    model_kwargs=None,
):
    """masked_diffusion_terms, its checks' messages naming ``fn``."""
    mask_id, eps = _check_loss_args(
        fn, model, input_ids, mask_id, eps, attention_mask, prompt_mask, generator, position_ids
    )
    eligible = _loss_eligible(input_ids, attention_mask, prompt_mask)
    masked, t = _draw(eligible, eps, generator, position_ids)
    noisy_ids = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    extra = dict(model_kwargs or {})
    if position_ids is not None:
        extra["position_ids"] = position_ids
    logits = model(input_ids=noisy_ids, attention_mask=attention_mask, **extra).logits
    if logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"model returned logits of shape {tuple(logits.shape)}; expected "
            f"({input_ids.shape[0]}, {input_ids.shape[1]}, vocab): the sequence length must be kept"
        )
    # Score only the masked positions: the (N, V) float32 slice is much smaller than (B, L, V).
    masked_logits, targets = logits[masked].float(), input_ids[masked]
    token_nll = F.cross_entropy(masked_logits, targets, reduction="none")
    weighted = (token_nll / t.expand_as(masked)[masked]).sum()
    n_tokens = eligible.sum()
    # `0 * logits.sum()` keeps every parameter in the graph when nothing is masked (DDP needs it).
    loss = (weighted + 0.0 * logits.sum().float()) / n_tokens.clamp(min=1)
    return {
        "loss": loss,
        "nll_sum": weighted.detach(),
        "n_masked": masked.sum(),
        "n_tokens": n_tokens,
        "masked_logits": masked_logits.detach(),
        "targets": targets,
    }


def masked_diffusion_loss(
    model,
    input_ids,
    *,
    mask_id,
    attention_mask=None,
    prompt_mask=None,
    position_ids=None,
    model_kwargs=None,
    eps=1e-3,
    generator=None,
):
    """The LLaDA / MDLM masked diffusion objective (an upper bound on the negative log-likelihood).

    Per sequence a noise level t ~ U(eps, 1] is drawn; every loss-eligible token is replaced by
    ``mask_id`` with probability t; the model predicts the clean tokens and the cross-entropy on the
    masked positions is weighted by 1/t. The sum is divided by the number of loss-eligible tokens in
    the batch (for unpadded pre-training batches that is B * L, as in LLaDA).

    Args:
        model: a callable returning an object with ``.logits`` (B, L, V) (any Hugging Face model,
            the zoo's DiffusionLM), called as ``model(input_ids=noisy_ids,
            attention_mask=attention_mask)``.
        input_ids: (B, L) int64 clean token ids.
        mask_id: id of the mask token.
        attention_mask: optional (B, L) 0/1 or bool, 1 = real token. Padding is never masked, never
            scored, and passed on to the model.
        prompt_mask: optional (B, L) bool, True = prompt token: never masked and never scored (SFT).
        position_ids: optional (B, L) int, passed on to the model. Packed rows (several documents
            in a row, positions restarting at each, as DataCollatorWithFlattening makes them):
            each document draws its own t, as it would in a row of its own. The model must keep
            the documents apart too (a model patched by sinkdlm.hf does).
        model_kwargs: optional dict of further keyword arguments for the model (the collator's
            ``cu_seq_lens_q`` / ``cu_seq_lens_k``, for example).
        eps: smallest noise level, 0 < eps < 1, so that 1/t stays bounded.
        generator: optional torch.Generator (on input_ids' device) for t and the masks.

    Returns:
        scalar float32 loss tensor (differentiable w.r.t. the model's parameters).
    """
    fn = "masked_diffusion_loss"
    terms = _terms(
        fn,
        model,
        input_ids,
        mask_id,
        attention_mask,
        prompt_mask,
        eps,
        generator,
        position_ids,
        model_kwargs,
    )
    return terms["loss"]
