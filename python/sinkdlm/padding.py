"""The (B, L) bool key-padding mask the ops take (True = real token), from the masks models pass.

Two entry points because the two kinds of mask read differently: a model-level attention mask
is (B, L) per token (1 = real), while an SDPA mask broadcasts against (B, H, L, S), so that a 2-D
SDPA mask means (L, S), not (B, L). Both end in one decoder of 4-D masks. A mask that is more than
key padding (causal, sliding window, biases) is refused: sink attention is bidirectional.
"""

from __future__ import annotations

import torch

__all__ = ["key_padding_from_model_mask", "key_padding_from_sdpa_mask"]


def key_padding_from_sdpa_mask(
    mask: torch.Tensor | None, batch: int, length: int, who: str, *, check_pattern: bool = True
) -> torch.Tensor | None:
    """The key padding behind a 4-D SDPA mask, or None for no mask.

    Args:
        mask: ``(B or 1, 1, L or 1, L)``, bool (True = may attend) or additive float (0 = may
            attend, a large negative number = may not).
        batch, length: B and L of the attention it masks.
        who: names the caller in errors.
        check_pattern: also verify (one host sync) that it is key padding: a float mask holds only
            0 and large negative numbers, and each query row sees exactly the real keys (a padded
            query row may see nothing). A key is real if some query row sees it.

    Returns:
        bool ``(B, L)``.
    """
    if mask is None:
        return None
    shape = tuple(mask.shape)
    if (
        mask.dim() != 4
        or shape[0] not in (1, batch)
        or shape[1] != 1
        or shape[2] not in (1, length)
        or shape[3] != length
    ):
        raise ValueError(
            f"{who} takes (B, 1, L, L) or (B, 1, 1, L) key-padding masks for B={batch}, "
            f"L={length}; got shape {shape}"
        )
    if mask.dtype == torch.bool:
        visible = mask
    elif mask.is_floating_point():
        visible = mask > torch.finfo(mask.dtype).min / 2
        if check_pattern and not bool(((mask == 0) | ~visible).all()):
            raise ValueError(f"{who}: float masks with biases (not 0 / -inf) are not supported")
    else:
        raise ValueError(f"{who} takes bool or additive float 4-D masks, got {mask.dtype}")
    visible = visible.expand(batch, 1, length, length)[:, 0]
    key_padding_mask = visible.any(1)
    if check_pattern and shape[2] != 1:  # one row for every query is key padding by construction
        real_rows = visible.any(2)
        if not bool((visible == (key_padding_mask[:, None, :] & real_rows[:, :, None])).all()):
            raise ValueError(
                f"{who} takes bidirectional attention with key padding; this mask has another "
                "pattern (causal, sliding window, ...)"
            )
    return key_padding_mask


def key_padding_from_model_mask(
    mask: torch.Tensor | None, batch: int, length: int, who: str, *, check_pattern: bool = True
) -> torch.Tensor | None:
    """The key padding behind a model's ``attention_mask`` argument, or None for no mask.

    ``mask`` is ``(B, L)`` int or bool (1 / True = real token), or a 4-D SDPA mask, decoded by
    :func:`key_padding_from_sdpa_mask` (with ``check_pattern``). Returns bool ``(B, L)``.
    """
    if mask is None or mask.dim() == 4:
        return key_padding_from_sdpa_mask(mask, batch, length, who, check_pattern=check_pattern)
    if mask.dim() != 2 or tuple(mask.shape) != (batch, length):
        raise ValueError(
            f"{who} takes a (B, L) = ({batch}, {length}) padding mask (1 = real token) or a 4-D "
            f"key-padding mask; got shape {tuple(mask.shape)}"
        )
    if mask.is_floating_point():
        raise ValueError(f"{who} takes 0/1 or bool (B, L) padding masks, not float masks")
    return mask if mask.dtype == torch.bool else mask != 0
