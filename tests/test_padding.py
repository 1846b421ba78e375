"""sinkdlm.padding: the key-padding mask behind model-level and SDPA attention masks."""

import pytest
import torch

from sinkdlm.padding import key_padding_from_model_mask, key_padding_from_sdpa_mask

REAL = torch.tensor([[True] * 6, [True] * 4 + [False] * 2, [False] + [True] * 5])


def padding_4d(real):
    """(B, 1, L, L) bool: real query and real key, the mask Dream and transformers build."""
    return real[:, None, :, None] & real[:, None, None, :]


def additive(mask):
    return torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)


@pytest.mark.parametrize(
    "mask",
    [REAL, REAL.long(), REAL[:, None, None, :], padding_4d(REAL), additive(padding_4d(REAL))],
    ids=["bool", "int", "B11L", "B1LL", "additive"],
)
def test_model_masks_decode_to_the_real_tokens(mask):
    got = key_padding_from_model_mask(mask, 3, 6, "test")
    assert got.dtype == torch.bool and torch.equal(got, REAL)


def test_no_mask_is_no_padding():
    assert key_padding_from_model_mask(None, 3, 6, "test") is None
    assert key_padding_from_sdpa_mask(None, 3, 6, "test") is None


def test_a_mask_shared_by_the_batch_is_broadcast():
    got = key_padding_from_sdpa_mask(padding_4d(REAL[1:2]), 3, 6, "test")
    assert torch.equal(got, REAL[1:2].expand(3, 6))


def causal():
    return torch.ones(6, 6, dtype=torch.bool).tril().expand(3, 1, 6, 6)


@pytest.mark.parametrize(
    "mask, message",
    [
        (causal(), "bidirectional attention with key padding"),
        (additive(causal()), "bidirectional attention with key padding"),
        (additive(padding_4d(REAL)) + 0.5, "biases"),
        (REAL.float(), "not float masks"),
        (REAL[:, :5], r"\(B, L\) = \(3, 6\)"),
        (padding_4d(REAL).expand(3, 2, 6, 6), r"\(B, 1, L, L\)"),
        (padding_4d(REAL).long(), "bool or additive float"),
    ],
    ids=["causal", "causal additive", "bias", "float 2-D", "length", "heads", "int 4-D"],
)
def test_other_masks_are_refused(mask, message):
    with pytest.raises(ValueError, match=f"^who.*{message}"):
        key_padding_from_model_mask(mask, 3, 6, "who")


def test_sdpa_masks_are_never_read_as_per_token():
    """A 2-D SDPA mask is (L, S) and broadcasts over the batch: not a (B, L) padding mask."""
    with pytest.raises(ValueError, match=r"\(B, 1, L, L\)"):
        key_padding_from_sdpa_mask(torch.ones(6, 6, dtype=torch.bool), 6, 6, "test")


def test_the_pattern_check_can_be_skipped():
    """Callers that build the mask themselves (Dream) skip the check and its host sync."""
    got = key_padding_from_sdpa_mask(causal(), 3, 6, "test", check_pattern=False)
    assert got.all()  # every key is seen by some query
