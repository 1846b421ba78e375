"""SMDM / LLaDA masked-diffusion objective for the zoo models.

A sequence draws t ~ U(0,1); each real token is masked independently with p_mask = (1-eps)*t + eps;
the loss is the cross-entropy on masked tokens divided by p_mask, summed and divided by the number
of real tokens: an upper bound on the negative log-likelihood per token (the ELBO bound). Sink
tokens live inside the model, so they are never masked and never in the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _checks
from ..train import check_loss_args


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def draw_masks(input_ids, *, eps=1e-3, attention_mask=None, prompt_mask=None, generator=None):
    """Masking draw of the forward process.

    Returns (masked bool (B,L), p_mask float32 (B,1)). Padding (attention_mask == 0) and prompt
    tokens (prompt_mask True) are never masked. Random numbers come from ``generator`` (on
    input_ids' device) so two models can be scored on identical draws.
    """
    eps = _checks.real("draw_masks", "eps", eps, 0, 1, low_open=True, high_open=True)
    b, n = input_ids.shape
    dev = input_ids.device
    t = torch.rand(b, 1, device=dev, generator=generator)
    p_mask = (1 - eps) * t + eps
    masked = torch.rand(b, n, device=dev, generator=generator) < p_mask
    if attention_mask is not None:
        masked &= attention_mask.to(torch.bool)
    if prompt_mask is not None:
        masked &= ~prompt_mask.to(torch.bool)
    return masked, p_mask


def smdm_terms(
    model, input_ids, *, mask_id, eps=1e-3, attention_mask=None, prompt_mask=None, generator=None
):
    """One noisy forward pass: dict of float32 scalars ``loss`` (the bound, differentiable),
    ``nll_sum`` (sum of p_mask-weighted CE), ``correct`` (masked tokens predicted right),
    ``n_masked`` and ``n_tokens`` (real tokens)."""
    check_loss_args(
        "smdm_terms", model, input_ids, mask_id, eps, attention_mask, prompt_mask, generator
    )
    masked, p_mask = draw_masks(
        input_ids,
        eps=eps,
        attention_mask=attention_mask,
        prompt_mask=prompt_mask,
        generator=generator,
    )
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    logits = _logits(model(noisy, attention_mask=attention_mask)).float()
    ce = F.cross_entropy(logits[masked], input_ids[masked], reduction="none")
    weight = p_mask.expand_as(masked)[masked]
    real = (
        torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask is None
        else attention_mask.to(torch.bool)
    )
    if prompt_mask is not None:
        real = real & ~prompt_mask.to(torch.bool)
    n_tokens = real.sum().to(torch.float32)
    nll_sum = (ce / weight).sum()
    correct = (logits[masked].argmax(-1) == input_ids[masked]).sum()
    return {
        "loss": nll_sum / n_tokens.clamp_min(1),
        "nll_sum": nll_sum.detach(),
        "correct": correct,
        "n_masked": masked.sum(),
        "n_tokens": n_tokens,
    }


def smdm_loss(
    model, input_ids, *, mask_id, eps=1e-3, attention_mask=None, prompt_mask=None, generator=None
):
    """SMDM training loss (scalar float32, differentiable); see module docstring."""
    return smdm_terms(
        model,
        input_ids,
        mask_id=mask_id,
        eps=eps,
        attention_mask=attention_mask,
        prompt_mask=prompt_mask,
        generator=generator,
    )["loss"]


@torch.no_grad()
def evaluate_masked_diffusion(model, batches, *, mask_id, seed=0, eps=1e-3, device="cpu", draws=1):
    """Validation ELBO bound and masked-token accuracy over an iterable of (B,L) id tensors.

    The masking draws depend only on ``seed`` and the data, so two models evaluated with the same
    seed see exactly the same masked positions. Returns {"loss", "accuracy", "n_masked"}.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    nll = correct = masked = tokens = 0.0
    for batch in batches:
        batch = batch.to(device)
        for _ in range(draws):
            terms = smdm_terms(model, batch, mask_id=mask_id, eps=eps, generator=gen)
            nll += float(terms["nll_sum"])
            correct += float(terms["correct"])
            masked += float(terms["n_masked"])
            tokens += float(terms["n_tokens"])
    model.train(was_training)
    return {
        "loss": nll / max(tokens, 1.0),
        "accuracy": correct / max(masked, 1.0),
        "n_masked": int(masked),
    }
