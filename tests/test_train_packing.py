"""masked_diffusion_loss on packed rows: one noise level per document."""

import pytest
import torch
import torch.nn.functional as F

from sinkdlm.train import draw_masks, masked_diffusion_loss

VOCAB, MASK_ID = 11, 10


class _RecordingModel(torch.nn.Module):
    """Logits from a learned table; records the keyword arguments it was given."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(VOCAB, VOCAB, dtype=torch.float64))
        self.seen = None

    def forward(self, input_ids, attention_mask=None, **kwargs):
        self.seen = dict(kwargs, input_ids=input_ids.clone())
        return type("Out", (), {"logits": self.table[input_ids]})()


def packed_positions(rows):
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in rows])


def test_each_document_draws_its_own_noise_level():
    rows = [[300, 1, 500, 199], [1000]]
    positions = packed_positions(rows)
    ids = torch.zeros_like(positions)
    gen = torch.Generator().manual_seed(4)
    masked, t = draw_masks(ids, position_ids=positions, generator=gen)
    assert t.shape == ids.shape
    start = 0
    levels = []
    for n in rows[0]:
        doc = t[0, start : start + n]
        assert bool((doc == doc[0]).all())  # one t per document ...
        levels.append(float(doc[0]))
        if n >= 300:  # ... and its masking rate follows its own t
            assert abs(float(masked[0, start : start + n].float().mean()) - levels[-1]) < 0.1
        start += n
    assert len(set(levels)) == len(levels)  # ... drawn independently
    # A row without restarts draws its t exactly as without position_ids.
    plain_masked, plain_t = draw_masks(ids[1:], generator=torch.Generator().manual_seed(9))
    row_masked, row_t = draw_masks(
        ids[1:], position_ids=positions[1:], generator=torch.Generator().manual_seed(9)
    )
    assert torch.equal(row_masked, plain_masked) and torch.equal(row_t, plain_t)


def test_packed_loss_is_the_per_document_formula_and_passes_the_packing_on():
    rows = [[4, 1, 6], [5, 6]]
    positions = packed_positions(rows)
    ids = torch.randint(0, MASK_ID, positions.shape, generator=torch.Generator().manual_seed(0))
    cu = torch.tensor([0, 4, 5, 11], dtype=torch.int32)
    model = _RecordingModel()
    loss = masked_diffusion_loss(
        model,
        ids,
        mask_id=MASK_ID,
        position_ids=positions,
        model_kwargs={"cu_seq_lens_q": cu},
        generator=torch.Generator().manual_seed(1),
    )
    assert model.seen["position_ids"] is positions and model.seen["cu_seq_lens_q"] is cu
    masked, t = draw_masks(ids, position_ids=positions, generator=torch.Generator().manual_seed(1))
    assert torch.equal(model.seen["input_ids"], torch.where(masked, MASK_ID, ids))
    logits = model.table[torch.full_like(ids[masked], MASK_ID)]  # the model sees mask tokens
    nll = F.cross_entropy(logits, ids[masked], reduction="none")
    torch.testing.assert_close(loss, (nll / t[masked]).sum().float() / ids.numel())


def test_position_ids_are_checked():
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="position_ids"):
        masked_diffusion_loss(
            _RecordingModel(),
            ids,
            mask_id=MASK_ID,
            position_ids=torch.zeros(2, 4, dtype=torch.long),
        )
    with pytest.raises(TypeError, match="position_ids"):
        draw_masks(ids, position_ids=torch.zeros(2, 5))
