"""The adapter backend: remote-code DLMs whose attention calls SDPA itself (LLaDA, Dream).

An adapter names the attention module classes it handles, the method it swaps on each instance,
the replacement and how to run the sink alone through the model. To add an architecture, write
those two functions for its attention module and call ``register_adapter``::

    register_adapter(SinkAdapter(
        name="MyDLM", attention_classes=("MyDLMAttention",), method="forward",
        replacement=my_forward,           # (module, *the method's args) -> what the method returns
        run_sink_pass=run_my_sink_pass))  # (original_forward, embeds (1,1,d), position_ids (1,1))

The replacement is bound to each attention module. ``layer_sink(module)`` gives it
``(sink, layer_key, sink_position)``: when ``sink.collect`` is set (the sink pass, one token) it
stores the layer's sink K (rotated to ``sink_position``) and V, each (Hkv, D), under
``sink.kv[layer_key]`` and returns the attention output o = V; otherwise it calls
``observed_sink_attention(module, layer_key, q, k, v, *sink.kv[layer_key], ...)`` (from
``sinkdlm.protocol``: sinkdlm.sink_attention, reporting to AttentionRecorder while it records) on
the user's tokens.
"""

import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..padding import key_padding_from_model_mask
from ..protocol import observed_sink_attention
from .layer import SinkKV, autocast_inputs, expand_sink_output
from .registry import register_patch_path


@dataclass(frozen=True)
class SinkAdapter:
    """How sinkdlm patches one remote-code architecture (see the module docstring)."""

    name: str
    attention_classes: tuple
    method: str
    replacement: Callable
    run_sink_pass: Callable


def register_adapter(adapter):
    """Registers ``adapter`` (hf/registry.py) for every class in ``adapter.attention_classes``."""
    if not isinstance(adapter, SinkAdapter):
        raise TypeError(f"register_adapter takes a SinkAdapter, got {type(adapter).__name__}")
    for class_name in adapter.attention_classes:
        register_patch_path(class_name, lambda model, adapter=adapter: AdapterBackend(adapter))


LINK = "_sinkdlm_layer"


class LayerLink:
    """Stored on each patched attention module: its model's sink state and its layer key.

    Kept in the module's ``__dict__`` (not a closure) so ``copy.deepcopy`` of a patched model
    links the copied layers to the copied state.
    """

    def __init__(self, state, layer_key):
        self.state = state
        self.layer_key = layer_key


def layer_sink(module):
    """(SinkKV of the running forward, layer key, sink_position) for a patched attention module."""
    link = module.__dict__[LINK]
    sink = link.state.channel
    if sink is None:
        raise RuntimeError(
            "a sinkdlm-patched attention layer was called outside the patched "
            "model's forward (call the model, not its layers)"
        )
    return sink, link.layer_key, link.state.sink_position


class AdapterBackend:
    """Remote-code models: a registered adapter swaps their attention method per instance."""

    name = "adapter"

    def __init__(self, adapter):
        self.adapter = adapter
        self.patched = []

    def install(self, state):
        modules = [
            m for m in state.host.modules() if type(m).__name__ in self.adapter.attention_classes
        ]
        method = self.adapter.method
        for layer_key, module in enumerate(modules):
            saved = module.__dict__.get(method)
            module.__dict__[LINK] = LayerLink(state, layer_key)
            setattr(module, method, types.MethodType(self.adapter.replacement, module))
            self.patched.append((module, saved))

    def uninstall(self, state):
        method = self.adapter.method
        for module, saved in self.patched:
            delattr(module, method)
            del module.__dict__[LINK]
            if saved is not None:
                setattr(module, method, saved)
        self.patched = []

    def sink_pass(self, state, embeds, position_ids):
        collector = SinkKV(collect=True)
        state.channel = collector
        try:
            self.adapter.run_sink_pass(state.original_forward, embeds, position_ids)
        finally:
            state.channel = None
        return collector.kv

    def main(self, state, sink_kv, args, kwargs):
        # Left set after the call: gradient checkpointing re-runs the layers during backward.
        state.channel = SinkKV(sink_kv)
        return state.original_forward(*args, **kwargs)

    def attention_layers(self, state):
        return [module for module, _ in self.patched]


def _no_kv_cache(past):
    if past is not None:
        raise NotImplementedError(
            "KV caches are not supported with the sink token (diffusion LMs "
            "re-run the whole sequence); pass use_cache=False"
        )


def _rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


# ----- LLaDA (modeling_llada.py): LLaDABlock.attention(q, k, v, attention_bias, layer_past,
# use_cache) takes the projected (B, T, C) q/k/v, applies rotary itself (positions 0..T-1, no
# position_ids) and calls SDPA without a mask (LLaDA ignores padding; so does its sink adapter).


def _llada_rotate_to(module, key, position):
    """key (1, Hkv, 1, D) at rotary position 0 (unrotated) -> rotated to ``position``."""
    if not module.config.rope:
        return key
    sin, cos = module.rotary_emb.get_rotary_embedding(abs(position) + 1, key.device)
    sin = sin[:, :, abs(position) : abs(position) + 1].float()
    cos = cos[:, :, abs(position) : abs(position) + 1].float()
    if position < 0:  # rotation by -p: cos is even, sin is odd
        sin = -sin
    return module.rotary_emb.apply_rotary_pos_emb(sin, cos, key.float()).type_as(key)


def _llada_attention(module, q, k, v, attention_bias=None, layer_past=None, use_cache=False):
    _no_kv_cache(layer_past)
    config = module.config
    batch, length, width = q.shape
    if getattr(module, "q_norm", None) is not None:
        q = module.q_norm(q).to(k.dtype)
        k = module.k_norm(k).to(k.dtype)
    head_dim = width // config.n_heads
    q = q.view(batch, length, config.n_heads, head_dim).transpose(1, 2)
    k = k.view(batch, length, -1, head_dim).transpose(1, 2)
    v = v.view(batch, length, -1, head_dim).transpose(1, 2)
    present = (k, v) if use_cache else None
    sink, layer_key, sink_position = layer_sink(module)
    if sink.collect:
        sink.kv[layer_key] = (_llada_rotate_to(module, k, sink_position)[0, :, 0], v[0, :, 0])
        out = expand_sink_output(v, config.n_heads)
    else:
        if config.rope:
            q, k = module.rotary_emb(q, k)
        inputs = autocast_inputs(q, k, v, *sink.kv[layer_key])
        out = observed_sink_attention(module, layer_key, *inputs).transpose(1, 2)
    return module.attn_out(out.reshape(batch, length, width)), present


def _llada_sink_pass(original_forward, embeds, position_ids):
    # LLaDA derives rotary positions from the length; the adapter rotates the sink K itself.
    original_forward(input_ids=None, input_embeddings=embeds, use_cache=False)


register_adapter(
    SinkAdapter(
        name="LLaDA",
        attention_classes=("LLaDALlamaBlock", "LLaDASequentialBlock"),
        method="attention",
        replacement=_llada_attention,
        run_sink_pass=_llada_sink_pass,
    )
)


# ----- Dream (modeling_dream.py): DreamAttention / DreamSdpaAttention.forward(hidden_states,
# attention_mask, position_ids, past_key_value, output_attentions, use_cache, cache_position,
# position_embeddings) -> (out, weights, past); Qwen2-shaped, rotary from position_embeddings.
# Dream passes a (B, 1, L, L) mask (or a (B, L) one) straight to SDPA; its key padding is used.


def _dream_key_padding(mask, batch, length):
    if isinstance(mask, str):  # Dream's own sampler passes "full" when nothing is padded
        return None
    # Dream builds its 4-D masks as real query & real key: the pattern check (a host sync in
    # every layer) is skipped.
    return key_padding_from_model_mask(
        mask, batch, length, "Dream sink attention", check_pattern=False
    )


def _dream_forward(
    module,
    hidden_states,
    attention_mask=None,
    position_ids=None,
    past_key_value=None,
    output_attentions=False,
    use_cache=False,
    cache_position=None,
    position_embeddings=None,
    **kwargs,
):
    _no_kv_cache(past_key_value)
    batch, length, _ = hidden_states.shape
    shape = (batch, length, -1, module.head_dim)
    q = module.q_proj(hidden_states).view(shape).transpose(1, 2)
    k = module.k_proj(hidden_states).view(shape).transpose(1, 2)
    v = module.v_proj(hidden_states).view(shape).transpose(1, 2)
    cos, sin = (
        module.rotary_emb(v, position_ids) if position_embeddings is None else position_embeddings
    )
    # Dream's own rotary helper when its module has one (it is Qwen2's formula either way)
    rope = getattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb", None)
    if rope is not None:
        q, k = rope(q, k, cos, sin)
    else:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    sink, layer_key, _ = layer_sink(module)
    if sink.collect:
        sink.kv[layer_key] = (k[0, :, 0], v[0, :, 0])
        out = expand_sink_output(v, q.shape[1])
    else:
        out = observed_sink_attention(
            module,
            layer_key,
            *autocast_inputs(q, k, v, *sink.kv[layer_key]),
            key_padding_mask=_dream_key_padding(attention_mask, batch, length),
        )
        out = out.transpose(1, 2)
    return module.o_proj(out.reshape(batch, length, -1)), None, past_key_value


def _dream_sink_pass(original_forward, embeds, position_ids):
    original_forward(inputs_embeds=embeds, position_ids=position_ids, use_cache=False)


register_adapter(
    SinkAdapter(
        name="Dream",
        attention_classes=("DreamAttention", "DreamSdpaAttention"),
        method="forward",
        replacement=_dream_forward,
        run_sink_pass=_dream_sink_pass,
    )
)
