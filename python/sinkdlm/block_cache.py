"""Fast-dLLM's block-wise approximate KV cache, and how the sampler runs a model with it.

A diffusion sampler fills a sequence block by block, and within a block only the block's tokens
change from step to step. Fast-dLLM (arXiv 2505.22618) therefore runs one full forward at the
start of each block, keeps every layer's keys and values, and lets the block's later steps feed
only some tokens as queries, attending to the kept K/V of the rest plus their own fresh K/V:

* ``"prefix"``: the queries are the block and everything after it (the still-masked suffix);
  the prompt and the finished blocks come from the cache.
* ``"dual"``: the queries are the block alone; the suffix comes from the cache too.

The cache is refreshed at every block boundary (the next full forward). The approximation is
that cached rows do not see the block's tokens change. A sink token is the cache's first row:
its K/V do not depend on the input, so a model computes them once per call and keeps them in
:attr:`BlockKVCache.sink_kv`, which a refresh never touches.

How a model takes part: through its block forward (:func:`sinkdlm.protocol.block_forward`),
whose layers pass their K/V through :meth:`BlockKVCache.update`.
"""

from __future__ import annotations

import torch

CACHE_MODES = ("prefix", "dual")

__all__ = ["CACHE_MODES", "BlockKVCache"]


class BlockKVCache:
    """Per-layer keys and values of one sampling call, refreshed at each block.

    Layers call :meth:`update` with the K/V of the tokens they were given and attend to what it
    returns. Two phases alternate:

    * after :meth:`refresh`, the next forward feeds the whole sequence (T tokens): each layer's
      K/V are stored (copied, so the cache owns them) and returned unchanged, so that forward's
      output is the uncached forward's, bit for bit;
    * after :meth:`step` (``query_start``, ``query_end``), forwards feed the tokens at positions
      ``[query_start, query_end)``: their fresh K/V overwrite those rows and the whole (B, Hkv, T,
      D) buffers come back (cached rows elsewhere, fresh rows there).

    ``sink_kv``: per-layer sink K/V (any layout the model chooses), None until the model stores
    them on its first forward; kept for the whole call.

    Args:
        mode: ``"prefix"`` or ``"dual"`` (what the sampler feeds as queries; recorded here).
    """

    def __init__(self, mode: str):
        if mode not in CACHE_MODES:
            raise ValueError(f"BlockKVCache: mode must be one of {CACHE_MODES}, got {mode!r}")
        self.mode = mode
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.sink_kv: dict | None = None
        self.refreshing = True
        self.length = 0
        self.query_start = 0
        self.query_end = 0

    def refresh(self, length: int) -> None:
        """The next forward feeds the whole sequence of ``length`` tokens and refills the cache."""
        self.refreshing = True
        self.length = self.query_end = length
        self.query_start = 0

    def step(self, query_start: int, query_end: int) -> None:
        """Later forwards feed the tokens at ``[query_start, query_end)`` against the cache."""
        if not self.keys:
            raise RuntimeError("BlockKVCache.step: the cache is empty; refresh it with a forward")
        if not 0 <= query_start < query_end <= self.length:
            raise ValueError(
                f"BlockKVCache.step: need 0 <= query_start < query_end <= {self.length}, got "
                f"[{query_start}, {query_end})"
            )
        self.refreshing = False
        self.query_start, self.query_end = query_start, query_end

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor):
        """K/V (B, Hkv, Lq, D) of the fed tokens -> the K/V the layer attends to.

        Refreshing: stores them and returns them as they are. Otherwise: writes them at rows
        ``[query_start, query_end)`` and returns the layer's whole (B, Hkv, T, D) buffers.
        """
        if self.refreshing:
            if key.shape[2] != self.length:
                raise ValueError(
                    f"BlockKVCache: a refreshing forward must feed all {self.length} tokens, "
                    f"layer {layer} got {key.shape[2]}"
                )
            self.keys[layer] = key.clone(memory_format=torch.contiguous_format)
            self.values[layer] = value.clone(memory_format=torch.contiguous_format)
            return key, value
        keys, values = self.keys.get(layer), self.values.get(layer)
        if keys is None:
            raise RuntimeError(f"BlockKVCache: layer {layer} stored nothing when refreshed")
        rows = slice(self.query_start, self.query_end)
        if key.shape[2] != self.query_end - self.query_start or key.shape[:2] != keys.shape[:2]:
            raise ValueError(
                f"BlockKVCache: layer {layer} was fed K/V of shape {tuple(key.shape)}, expected "
                f"{tuple(keys.shape[:2])} x {self.query_end - self.query_start} tokens "
                f"(positions [{self.query_start}, {self.query_end}))"
            )
        keys[:, :, rows] = key
        values[:, :, rows] = value
        return keys, values

    def query_positions(self, device=None) -> torch.Tensor:
        """(Lq,) int64 sequence positions of the tokens the next forward feeds."""
        return torch.arange(self.query_start, self.query_end, device=device)
