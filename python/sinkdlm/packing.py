"""Packed rows: several documents in one row of a batch, kept apart by segment ids.

:func:`sinkdlm.sink_attention` takes ``segment_ids``, int ``(B, L)``, non-decreasing along each
row: one run of equal ids per document. A token attends to the sink and to the tokens of its own
run only. Two other forms describe the same packing and convert here:

* ``cu_seqlens``: the documents' cumulative starts over a batch flattened to one row,
  ``[0, n_0, n_0 + n_1, ..., total]`` (flash attention's varlen form; transformers'
  ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` passes it as ``cu_seq_lens_q/k``).
* ``position_ids`` that restart at each document (what that collator returns by default): a
  document starts wherever a position is not its predecessor's plus one.

Padding stays the key padding mask's business: with segments it applies as well.
"""

from __future__ import annotations

import torch

__all__ = [
    "segment_ids_from_cu_seqlens",
    "segment_ids_from_position_ids",
    "segment_lengths",
]


def segment_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Segment ids ``(1, total)`` int64 of a batch flattened to one row.

    Args:
        cu_seqlens: int ``(N + 1,)``, starting at 0, non-decreasing: document ``n`` holds tokens
            ``cu_seqlens[n] .. cu_seqlens[n + 1] - 1``. Read on the host.
        total: the row's length; must equal ``cu_seqlens[-1]`` when given.

    Returns:
        int64 ``(1, total)`` on ``cu_seqlens``' device: token t's document index.
    """
    fn = "segment_ids_from_cu_seqlens"
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (
        torch.int32,
        torch.int64,
    ):
        got = getattr(cu_seqlens, "dtype", type(cu_seqlens).__name__)
        raise TypeError(f"{fn}: cu_seqlens must be an int32 or int64 tensor, got {got}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{fn}: cu_seqlens must be (N + 1,), got shape {tuple(cu_seqlens.shape)}")
    starts = cu_seqlens.cpu().tolist()
    if starts[0] != 0 or any(b < a for a, b in zip(starts, starts[1:], strict=False)):
        raise ValueError(f"{fn}: cu_seqlens must start at 0 and be non-decreasing, got {starts}")
    if total is not None and starts[-1] != total:
        raise ValueError(
            f"{fn}: cu_seqlens must end at the row's length {total}, got {starts[-1]} ({starts})"
        )
    lengths = torch.diff(cu_seqlens.to(torch.int64))
    ids = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)
    return ids.unsqueeze(0)


def segment_ids_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Segment ids ``(B, L)`` int64 from positions that restart at each document.

    A document starts at position 0 of the row and wherever ``position_ids[:, i] !=
    position_ids[:, i - 1] + 1``. Consecutive positions (``arange``, or an offset) are one
    segment. No host sync.

    Args:
        position_ids: int ``(B, L)``.
    """
    if not isinstance(position_ids, torch.Tensor) or position_ids.dtype not in (
        torch.int32,
        torch.int64,
    ):
        got = getattr(position_ids, "dtype", type(position_ids).__name__)
        raise TypeError(
            f"segment_ids_from_position_ids: position_ids must be an int tensor, got {got}"
        )
    if position_ids.dim() != 2:
        raise ValueError(
            "segment_ids_from_position_ids: position_ids must be (B, L), got shape "
            f"{tuple(position_ids.shape)}"
        )
    starts = torch.ones_like(position_ids, dtype=torch.int64)
    starts[:, 1:] = (position_ids[:, 1:] != position_ids[:, :-1] + 1).to(torch.int64)
    return starts.cumsum(1) - 1


def segment_lengths(segment_ids: torch.Tensor) -> list[list[int]]:
    """Each row's run lengths (documents in order), read on the host: for tests and reports."""
    rows = []
    for row in segment_ids.cpu():
        _, counts = torch.unique_consecutive(row, return_counts=True)
        rows.append(counts.tolist())
    return rows
