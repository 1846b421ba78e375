"""The (B, L) bool key-padding mask the ops take (True = real token), from the masks models pass;
and the (B, L) segment ids of packed rows, from the packing signals transformers passes.

Two entry points because the two kinds of mask read differently: a model-level attention mask
is (B, L) per token (1 = real), while an SDPA mask broadcasts against (B, H, L, S), so that a 2-D
SDPA mask means (L, S), not (B, L). Both end in one decoder of 4-D masks. A mask that is more than
key padding (causal, sliding window, biases) is refused: sink attention is bidirectional.
"""

from __future__ import annotations

import torch

from .packing import segment_ids_from_cu_seqlens, segment_ids_from_position_ids

__all__ = [
    "key_padding_from_model_mask",
    "key_padding_from_sdpa_mask",
    "segment_ids_from_packing",
]


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


def segment_ids_from_packing(
    position_ids: torch.Tensor | None,
    cu_seq_lens_q: torch.Tensor | None,
    cu_seq_lens_k: torch.Tensor | None,
    batch: int,
    q_len: int,
    k_len: int,
    who: str,
) -> torch.Tensor | None:
    """The segment ids ``(B, L)`` of packed rows behind what transformers passes an attention
    call, or None when every row is one sequence.

    Two signals, as transformers' ``DataCollatorWithFlattening`` makes them:

    * ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (with ``return_flash_attn_kwargs=True``): the
      documents' starts over a batch flattened to one row. Both must be given and equal (the
      queries are the keys), with B = 1 and the row as long as they say.
    * ``position_ids`` ``(B or 1, L)`` that restart at each document: a document starts wherever
      a position is not its predecessor's plus one (one host sync to see whether any does).

    Raises ValueError where it cannot tell documents apart: the two cu_seq_lens differ or do
    not cover the row, restarting positions over a KV cache (Lq != Lk), position_ids of another
    shape. Under torch.compile (no host sync) the ids from position_ids are returned whether or
    not they restart, and None under a KV cache.
    """
    if cu_seq_lens_q is not None or cu_seq_lens_k is not None:
        if cu_seq_lens_q is None or cu_seq_lens_k is None:
            raise ValueError(f"{who}: got only one of cu_seq_lens_q / cu_seq_lens_k; pass both")
        if not torch.equal(cu_seq_lens_q.cpu(), cu_seq_lens_k.cpu()):
            raise ValueError(
                f"{who}: cu_seq_lens_q and cu_seq_lens_k differ; packed rows need the queries' "
                "documents to be the keys' (no KV cache over packed rows)"
            )
        if batch != 1 or q_len != k_len:
            raise ValueError(
                f"{who}: cu_seq_lens_q/k describe a batch flattened to one row; got B = {batch}, "
                f"Lq = {q_len}, Lk = {k_len}"
            )
        try:
            return segment_ids_from_cu_seqlens(cu_seq_lens_q, q_len)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{who}: cu_seq_lens_q: {error}") from error
    if position_ids is None:
        return None
    if (
        not isinstance(position_ids, torch.Tensor)
        or position_ids.dim() != 2
        or position_ids.shape[0] not in (1, batch)
        or position_ids.shape[1] != q_len
    ):
        shape = tuple(position_ids.shape) if isinstance(position_ids, torch.Tensor) else None
        raise ValueError(
            f"{who}: cannot tell packed documents apart from position_ids of shape {shape}; "
            f"expected (B, Lq) = ({batch}, {q_len}) or (1, {q_len})"
        )
    segments = segment_ids_from_position_ids(position_ids)
    if torch.compiler.is_compiling():
        # No host sync inside a graph: the ids go in as they are (one segment per row gives the
        # unsegmented result); a KV cache's block positions are taken to be consecutive.
        return segments.expand(batch, -1) if q_len == k_len else None
    if q_len == 0 or not bool((segments[:, -1] > 0).any()):
        return None  # consecutive positions: one sequence per row
    if q_len != k_len:
        raise ValueError(
            f"{who}: position_ids restart inside the row (packed documents) while the queries "
            f"({q_len}) are fewer than the keys ({k_len}); packed rows under a KV cache are not "
            "supported"
        )
    return segments.expand(batch, -1)
