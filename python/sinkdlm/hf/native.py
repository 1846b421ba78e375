"""Sink attention for transformers-native models (AttentionInterface + AttentionMaskInterface).

Models whose attention layers call ``ALL_ATTENTION_FUNCTIONS`` (Llama, Qwen2, Qwen3, Mistral, and
the DLMs built on them) switch to the "sinkdlm" implementation with ``set_attn_implementation``.
The per-layer sink K/V travel to the attention function as the keyword argument ``sinkdlm_sink``
(transformers forwards a model's extra keyword arguments down to every attention call), so they are
plain data flow: torch.compile traces them and gradient checkpointing replays them.
"""

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ..protocol import observed_sink_attention

ATTN_IMPLEMENTATION = "sinkdlm"
SINK_KWARG = "sinkdlm_sink"
# Families whose equivalence with the paper's literal form is tested (Dream is Qwen2-shaped, LLaDA
# Llama-shaped when ported to transformers).
NATIVE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class SinkKV:
    """Per-forward channel between the model wrapper and the attention calls.

    ``collect=True`` (the sink pass): each layer stores its sink K (rotated at the sink position)
    and V, each (Hkv, D), under ``kv[layer_key]`` and returns o = V. Otherwise layers read ``kv``.
    """

    def __init__(self, kv=None, collect=False):
        self.kv = {} if kv is None else kv
        self.collect = collect


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


def key_padding_from_mask(attention_mask, key_length):
    """The (B, L) bool key-padding mask (True = real) carried by a transformers attention mask."""
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4 and attention_mask.shape[1] == 1 and attention_mask.shape[2] == 1:
        attention_mask = attention_mask[:, 0, 0]
    if attention_mask.dim() != 2 or attention_mask.shape[-1] != key_length:
        raise ValueError(
            "sinkdlm attention takes a (B, L) padding mask (1 = real token) or a (B, 1, 1, L) bool "
            f"mask for L={key_length} keys; got shape {tuple(attention_mask.shape)} "
            "(custom 4-D masks are not supported: the sink token defines the mask)"
        )
    if attention_mask.dtype != torch.bool:
        if attention_mask.is_floating_point():
            raise ValueError(
                "sinkdlm attention takes 0/1 or bool padding masks, not additive float masks"
            )
        attention_mask = attention_mask != 0
    return attention_mask


def sinkdlm_attention_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs
):
    """transformers attention function: bidirectional sink attention.

    query (B, H, L, D), key/value (B, Hkv, L, D) are used as given (no copy, no repeat_kv);
    returns ((B, L, H, D) contiguous, None). ``is_causal`` is ignored: DLM attention is
    bidirectional. The sink K/V come from ``kwargs["sinkdlm_sink"]``.
    """
    sink = kwargs.get(SINK_KWARG)
    if sink is None:
        raise RuntimeError(
            f"attn_implementation '{ATTN_IMPLEMENTATION}' needs the sink token: call "
            "sinkdlm.hf.add_sink_token(model) instead of setting the implementation by hand"
        )
    if dropout:
        raise NotImplementedError(
            "sinkdlm attention has no attention dropout; set the config's attention_dropout to 0"
        )
    layer_key = getattr(module, "layer_idx", None)
    if layer_key is None:
        raise RuntimeError(
            f"{type(module).__name__} has no layer_idx; sinkdlm cannot tell its layers apart"
        )
    if sink.collect:
        sink.kv[layer_key] = (key[0, :, 0], value[0, :, 0])
        return expand_sink_output(value, query.shape[1]), None
    if key.shape[2] != query.shape[2]:
        raise NotImplementedError(
            f"sinkdlm attention got {query.shape[2]} queries and {key.shape[2]} keys: KV caches "
            "are not supported (diffusion LMs re-run the whole sequence); pass use_cache=False"
        )
    window = kwargs.get("sliding_window")
    if window is not None and key.shape[2] > window:
        raise NotImplementedError(
            f"sequence of {key.shape[2]} tokens exceeds this layer's sliding window ({window}); "
            "sink attention is full bidirectional attention"
        )
    query, key, value, sink_k, sink_v = autocast_inputs(query, key, value, *sink.kv[layer_key])
    out = observed_sink_attention(
        module,
        layer_key,
        query,
        key,
        value,
        sink_k,
        sink_v,
        scale=scaling,
        key_padding_mask=key_padding_from_mask(attention_mask, key.shape[2]),
    )
    return out.transpose(1, 2).contiguous(), None


def sinkdlm_mask(*args, attention_mask=None, **kwargs):
    """transformers mask function: passes the (B, L) padding mask on (None when there is none).

    The sink mask is implied by the attention function, so no dense (L, L) mask is ever built; the
    causal / bidirectional pattern transformers asks for is ignored (DLMs are bidirectional).
    """
    return attention_mask


def register():
    """Registers the "sinkdlm" attention and mask functions with transformers (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, sinkdlm_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sinkdlm_mask)


def run_sink_pass(original_forward, embeds, position_ids):
    """Runs the sink alone (batch 1, length 1) through the model; returns {layer_idx: (K, V)}."""
    collector = SinkKV(collect=True)
    original_forward(
        inputs_embeds=embeds, position_ids=position_ids, use_cache=False, **{SINK_KWARG: collector}
    )
    return collector.kv


def call_with_sink(original_forward, sink_kv, args, kwargs):
    """The user's forward, with the per-layer sink K/V handed to every attention call."""
    return original_forward(*args, **kwargs, **{SINK_KWARG: SinkKV(sink_kv)})
