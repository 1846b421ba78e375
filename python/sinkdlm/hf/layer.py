"""What every backend's patched attention layer shares: the per-forward sink K/V channel, the
sink's own attention output, and the autocast rule."""

import torch


class SinkKV:
    """Per-forward channel between the model wrapper and the attention calls.

    ``collect=True`` (the sink pass): each layer stores its sink K (rotated at the sink position)
    and V, each (Hkv, D), under ``kv[layer_key]`` and returns o = V. Otherwise layers read ``kv``
    (empty for a model without the sink token, patched only for sinkdlm.generate's block cache).
    ``memo`` holds what every layer of one forward would otherwise recompute (a decoded mask).
    ``block``: the sampler's :class:`sinkdlm.block_cache.BlockKVCache` while the forward runs
    through it, else None; ``key_padding``: the sampler's (B, T) bool key padding over the whole
    sequence for its cached steps, which feed fewer tokens than there are keys (None: none).
    """

    def __init__(self, kv=None, collect=False, block=None, key_padding=None):
        self.kv = {} if kv is None else kv
        self.collect = collect
        self.block = block
        self.key_padding = key_padding
        self.memo = {}


def expand_sink_output(value, num_heads):
    """The sink attends only to itself, so its attention output is its own V.

    value (1, Hkv, 1, D) -> (1, 1, H, D), kv head j serving query heads j*r .. j*r + r - 1.
    """
    groups = num_heads // value.shape[1]
    return value.repeat_interleave(groups, dim=1).transpose(1, 2).contiguous()


def autocast_inputs(*tensors):
    """Under autocast, SDPA runs in the autocast dtype; sink attention does the same (rotary
    embeddings otherwise leave q/k in float32 next to a bfloat16 v)."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) for t in tensors)
