"""Training objectives for masked diffusion language models."""

import torch
import torch.nn.functional as F

from . import _checks


def check_loss_args(fn, model, input_ids, mask_id, eps, attention_mask, prompt_mask, generator):
    """The checks of a masked-diffusion loss's arguments; returns (mask_id, eps) as int, float.

    Token ids and mask_id must lie in ``model.config.vocab_size`` where the model declares it
    (else the embedding fails with a bare index error); 0 < eps < 1 (else the noise level t
    leaves (0, 1] and the weight 1/t changes the objective).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        _checks.fail(fn, "input_ids", "a (B, L) tensor of token ids", _checks.describe(input_ids))
    vocab_size = _checks.vocab_size_of(model)
    _checks.token_ids(fn, "input_ids", input_ids, vocab_size)
    mask_id = _checks.mask_id(fn, mask_id, vocab_size)
    eps = _checks.real(fn, "eps", eps, 0, 1, low_open=True, high_open=True)
    for name, mask in (("attention_mask", attention_mask), ("prompt_mask", prompt_mask)):
        if mask is None:
            continue
        if not isinstance(mask, torch.Tensor) or mask.is_floating_point():
            _checks.fail(
                fn, name, "a bool or 0/1 integer tensor", _checks.describe(mask), TypeError
            )
        if mask.shape != input_ids.shape:
            _checks.fail(
                fn, name, f"input_ids' shape {tuple(input_ids.shape)}", f"{tuple(mask.shape)}"
            )
    _checks.generator(fn, generator)
    return mask_id, eps


def masked_diffusion_loss(
    model, input_ids, *, mask_id, attention_mask=None, prompt_mask=None, eps=1e-3, generator=None
):
    """The LLaDA / MDLM masked diffusion objective (an upper bound on the negative log-likelihood).

    Per sequence a noise level t ~ U(eps, 1] is drawn; every loss-eligible token is replaced by
    ``mask_id`` with probability t; the model predicts the clean tokens and the cross-entropy on the
    masked positions is weighted by 1/t. The sum is divided by the number of loss-eligible tokens in
    the batch (for unpadded pre-training batches that is B * L, as in LLaDA).

    Args:
        model: a callable returning an object with ``.logits`` (B, L, V) (any Hugging Face model),
            called as ``model(input_ids=noisy_ids, attention_mask=attention_mask)``.
        input_ids: (B, L) int64 clean token ids.
        mask_id: id of the mask token.
        attention_mask: optional (B, L) 0/1 or bool, 1 = real token. Padding is never masked, never
            scored, and passed on to the model.
        prompt_mask: optional (B, L) bool, True = prompt token: never masked and never scored (SFT).
        eps: smallest noise level, 0 < eps < 1, so that 1/t stays bounded.
        generator: optional torch.Generator (on input_ids' device) for t and the masks.

    Returns:
        scalar float32 loss tensor (differentiable w.r.t. the model's parameters).
    """
    mask_id, eps = check_loss_args(
        "masked_diffusion_loss",
        model,
        input_ids,
        mask_id,
        eps,
        attention_mask,
        prompt_mask,
        generator,
    )
    batch, length = input_ids.shape
    device = input_ids.device
    eligible = torch.ones(batch, length, dtype=torch.bool, device=device)
    if attention_mask is not None:
        eligible &= attention_mask.to(torch.bool)
    if prompt_mask is not None:
        eligible &= ~prompt_mask.to(torch.bool)

    t = (1.0 - eps) * torch.rand(batch, 1, device=device, generator=generator) + eps
    masked = eligible & (torch.rand(batch, length, device=device, generator=generator) < t)
    noisy_ids = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)

    logits = model(input_ids=noisy_ids, attention_mask=attention_mask).logits
    if logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"model returned logits of shape {tuple(logits.shape)}; expected "
            f"({batch}, {length}, vocab): the sequence length must be kept"
        )
    # Score only the masked positions: the (N, V) float32 slice is much smaller than (B, L, V).
    token_nll = F.cross_entropy(logits[masked].float(), input_ids[masked], reduction="none")
    weighted = (token_nll / t.expand(batch, length)[masked]).sum()
    # `0 * logits.sum()` keeps every parameter in the graph when nothing is masked (DDP needs it).
    weighted = weighted + 0.0 * logits.sum().float()
    return weighted / eligible.sum().clamp(min=1)
