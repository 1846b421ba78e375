"""sinkdlm.train: the LLaDA / MDLM masked diffusion objective."""

import pytest
import torch
import torch.nn.functional as F

from sinkdlm.models import DiffusionLM, variant_config
from sinkdlm.train import masked_diffusion_loss

VOCAB, MASK_ID = 11, 10
ZOO_SIZE = dict(vocab_size=37, mask_id=1, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)


class _RecordingModel(torch.nn.Module):
    """Logits from a learned table; records the noisy ids it was given."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(VOCAB, VOCAB, dtype=torch.float64))
        self.seen = None

    def forward(self, input_ids, attention_mask=None):
        self.seen = input_ids.clone()
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_loss_matches_formula_and_respects_prompt_and_padding():
    torch.manual_seed(0)
    batch, length, eps = 3, 9, 1e-3
    ids = torch.randint(0, MASK_ID, (batch, length))
    attention = torch.ones(batch, length, dtype=torch.long)
    attention[1, 6:] = 0
    prompt = torch.zeros(batch, length, dtype=torch.bool)
    prompt[:, :2] = True
    model = _RecordingModel()
    gen = torch.Generator().manual_seed(123)
    loss = masked_diffusion_loss(
        model,
        ids,
        mask_id=MASK_ID,
        attention_mask=attention,
        prompt_mask=prompt,
        eps=eps,
        generator=gen,
    )

    # Re-draw the same noise and recompute by hand.
    gen = torch.Generator().manual_seed(123)
    t = (1 - eps) * torch.rand(batch, 1, generator=gen) + eps
    draw = torch.rand(batch, length, generator=gen)
    eligible = attention.bool() & ~prompt
    masked = eligible & (draw < t)
    assert torch.equal(model.seen, torch.where(masked, MASK_ID, ids))
    assert masked.any()
    nll = F.cross_entropy(
        model.table[model.seen].reshape(-1, VOCAB).float(), ids.reshape(-1), reduction="none"
    ).view(batch, length)
    expected = (nll / t * masked).sum() / eligible.sum()
    torch.testing.assert_close(loss, expected.float(), rtol=1e-6, atol=1e-6)

    loss.backward()
    assert model.table.grad is not None and model.table.grad.abs().sum() > 0


def test_nothing_masked_still_has_a_graph():
    model = _RecordingModel()
    ids = torch.randint(0, MASK_ID, (2, 4))
    prompt = torch.ones(2, 4, dtype=torch.bool)
    loss = masked_diffusion_loss(model, ids, mask_id=MASK_ID, prompt_mask=prompt)
    assert loss.item() == 0.0
    loss.backward()
    assert model.table.grad is not None


def test_bad_shapes_raise():
    model = _RecordingModel()
    with pytest.raises(ValueError, match="input_ids"):
        masked_diffusion_loss(model, torch.zeros(4, dtype=torch.long), mask_id=MASK_ID)
    with pytest.raises(ValueError, match="prompt_mask"):
        masked_diffusion_loss(
            model,
            torch.zeros(2, 4, dtype=torch.long),
            mask_id=MASK_ID,
            prompt_mask=torch.zeros(2, 3, dtype=torch.bool),
        )


def test_loss_formula_on_a_zoo_model():
    """The zoo's DiffusionLM (called with keywords, DiffusionLMOutput) under the same formula."""
    torch.manual_seed(4)
    model = DiffusionLM(variant_config("baseline", **ZOO_SIZE))
    ids = torch.randint(2, ZOO_SIZE["vocab_size"], (2, 10))
    gen = torch.Generator().manual_seed(5)
    got = masked_diffusion_loss(model, ids, mask_id=1, eps=0.1, generator=gen)
    gen = torch.Generator().manual_seed(5)
    t = torch.rand(2, 1, generator=gen)
    p = 0.9 * t + 0.1
    masked = torch.rand(2, 10, generator=gen) < p
    logits = model(torch.where(masked, 1, ids)).logits
    ce = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
    want = (ce * masked / p).sum() / ids.numel()
    torch.testing.assert_close(got, want)


def _zoo_model():
    from sinkdlm.models import DiffusionLM, DiffusionLMConfig

    return DiffusionLM(DiffusionLMConfig(vocab_size=VOCAB, mask_id=MASK_ID, d_model=16, n_layers=1))


def _losses():
    from sinkdlm.models import smdm_terms
    from sinkdlm.train import masked_diffusion_terms

    return [
        ("masked_diffusion_loss", masked_diffusion_loss),
        ("masked_diffusion_terms", masked_diffusion_terms),
        ("masked_diffusion_terms", smdm_terms),
    ]


@pytest.mark.parametrize(
    "which", [0, 1, 2], ids=["masked_diffusion_loss", "masked_diffusion_terms", "smdm_terms"]
)
@pytest.mark.parametrize(
    "override, exc, pattern",
    [
        (dict(eps=0.0), ValueError, r"eps must be a finite number with 0 < eps < 1, got 0.0"),
        (dict(eps=-0.5), ValueError, r"eps must be a finite number with 0 < eps < 1"),
        (dict(eps=1.5), ValueError, r"eps must be a finite number with 0 < eps < 1"),
        (dict(eps=float("nan")), ValueError, r"eps must be a finite number"),
        (dict(mask_id=VOCAB), ValueError, rf"mask_id must be an int with 0 <= mask_id <= {MASK_ID}"),  # noqa: E501
        (dict(mask_id=2**70), ValueError, r"mask_id must be an int with 0 <= mask_id"),
        (dict(input_ids=torch.tensor([[1, VOCAB]])), ValueError,
         rf"input_ids must be token ids in \[0, vocab_size = {VOCAB}\), got ids in \[1, {VOCAB}\]"),
        (dict(input_ids=torch.tensor([[1, -1]])), ValueError, r"input_ids must be token ids in"),
        (dict(input_ids=torch.tensor([[1.0, 2.0]])), TypeError,
         r"input_ids must be an integer tensor of token ids, got torch.float32"),
        (dict(attention_mask=torch.ones(1, 2)), TypeError,
         r"attention_mask must be a bool or 0/1 integer tensor"),
        (dict(generator=5), TypeError, r"generator must be a torch.Generator or None, got int 5"),
    ],
)  # fmt: skip
def test_bad_arguments_name_the_argument(which, override, exc, pattern):
    """Issue 19: eps <= 0 or > 1 silently changed the objective; float ids, out-of-vocabulary
    ids or mask_id failed inside the embedding ("index out of range in self")."""
    name, loss = _losses()[which]
    kwargs = {"input_ids": torch.tensor([[1, 2]]), "mask_id": MASK_ID, **override}
    with pytest.raises(exc, match=f"{name}: {pattern}"):
        loss(_zoo_model(), kwargs.pop("input_ids"), **kwargs)


def test_draw_masks_checks_eps():
    from sinkdlm.models import draw_masks

    with pytest.raises(ValueError, match="draw_masks: eps must be a finite number with 0 < eps"):
        draw_masks(torch.zeros(2, 3, dtype=torch.long), eps=2.0)
