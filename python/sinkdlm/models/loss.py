"""Evaluation of the zoo models on the masked-diffusion objective of sinkdlm.train.

The objective lives once, in sinkdlm.train (LLaDA / MDLM / SMDM: the 1/t-weighted cross-entropy on
masked tokens over the loss-eligible tokens, an upper bound on the NLL per token). The zoo's
names for it are kept: ``smdm_loss`` is ``masked_diffusion_loss``, ``smdm_terms`` its terms plus
the masked-token accuracy. Sink tokens live inside the model, so they are never masked and never
in the loss.
"""

from __future__ import annotations

import torch

from ..train import draw_masks, masked_diffusion_loss, masked_diffusion_terms

__all__ = ["draw_masks", "evaluate_masked_diffusion", "smdm_loss", "smdm_terms"]

smdm_loss = masked_diffusion_loss


def smdm_terms(
    model, input_ids, *, mask_id, eps=1e-3, attention_mask=None, prompt_mask=None, generator=None
):
    """:func:`sinkdlm.train.masked_diffusion_terms` plus ``correct``: the masked tokens the model
    predicts right (its argmax), a scalar int64."""
    terms = masked_diffusion_terms(
        model,
        input_ids,
        mask_id=mask_id,
        attention_mask=attention_mask,
        prompt_mask=prompt_mask,
        eps=eps,
        generator=generator,
    )
    terms["correct"] = (terms["masked_logits"].argmax(-1) == terms["targets"]).sum()
    return terms


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
