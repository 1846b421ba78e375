"""The adapter backend: remote-code DLMs whose attention calls SDPA itself (LLaDA, Dream).

An adapter names the attention module classes it handles, the method it swaps on each instance,
the replacement, the decoder layer classes and how to run the sink's row through one of them. To
add an architecture, write those functions for its modules and call ``register_adapter``::

    register_adapter(SinkAdapter(
        name="MyDLM", attention_classes=("MyDLMAttention",), method="forward",
        replacement=my_forward,           # (module, *the method's args) -> what the method returns
        layer_classes=("MyDLMDecoderLayer",),
        run_sink_row=run_my_sink_row,     # (layer_forward, hidden (1,1,d), position_ids (1,1),
                                          #  model) -> the layer's output hidden state (1,1,d)
        sink_input=None,                  # optional (model, embeds (1,1,d)) -> the first layer's
                                          # input, when the model transforms its embeddings
        final_norm=lambda model: ...,     # optional, for sinkdlm.generate (below)
        sampler_kwargs=my_sampler_kwargs))

The replacement is bound to each attention module. It names the arguments it implements; any
other keyword the original method takes is accepted when it has its default value (None, False)
and refused with NotImplementedError otherwise (Fast-dLLM's ``replace_position=``, for example),
and a keyword the original does not take raises TypeError, as the original would.
``layer_sink(module)`` gives it ``(sink, layer_key, sink_position)``: when ``sink.collect`` is
set (the sink's row, one token, run by ``run_sink_row`` inside each decoder layer's call) it
stores the layer's sink K (rotated to ``sink_position``) and V, each (Hkv, D), under
``sink.kv[layer_key]`` and returns the attention output o = V; otherwise it calls
``observed_sink_attention(module, layer_key, q, k, v, *sink.kv[layer_key], ...)`` (from
``sinkdlm.protocol``: sinkdlm.sink_attention, reporting to AttentionRecorder while it records) on
the user's tokens (``sink.kv`` has no entry for a model without the sink token). Classes are
matched by name along each module's class hierarchy (FSDP2's ``fully_shard`` subclasses them).

sinkdlm.generate's block forward (sinkdlm/hf/block_cache.py) needs two more fields:
``final_norm(model)``, the module whose output is the LM head's input (generate slices it to the
positions a step reads), and ``sampler_kwargs(tokens, attention_mask, positions)``, the model's
keyword arguments for one sampler forward. Under the block cache, ``sink.block`` is the
BlockKVCache: the replacement rotates the fed tokens at ``block.query_start ..`` and attends to
what ``block.update(layer_key, k, v)`` returns.
"""

import inspect
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..padding import (
    key_padding_from_model_mask,
    key_padding_from_sdpa_mask,
    segment_ids_from_packing,
)
from ..protocol import observed_sink_attention
from .layer import autocast_inputs, expand_sink_output
from .registry import register_patch_path


@dataclass(frozen=True)
class SinkAdapter:
    """How sinkdlm patches one remote-code architecture (see the module docstring)."""

    name: str
    attention_classes: tuple
    method: str
    replacement: Callable
    layer_classes: tuple
    run_sink_row: Callable
    sink_input: Callable | None = None
    final_norm: Callable | None = None
    sampler_kwargs: Callable | None = None


_ADAPTERS: dict[str, SinkAdapter] = {}


def register_adapter(adapter):
    """Registers ``adapter`` (hf/registry.py) for every class in ``adapter.attention_classes``."""
    if not isinstance(adapter, SinkAdapter):
        raise TypeError(f"register_adapter takes a SinkAdapter, got {type(adapter).__name__}")
    for class_name in adapter.attention_classes:
        _ADAPTERS[class_name] = adapter
        register_patch_path(class_name, lambda model, adapter=adapter: AdapterBackend(adapter))


def is_instance_of(module, class_names):
    """``module``'s class or one of its bases is named in ``class_names``."""
    return any(klass.__name__ in class_names for klass in type(module).__mro__)


def adapter_for(model):
    """The adapter of the first attention module of ``model`` that has one, else None."""
    for module in model.modules():
        for klass in type(module).__mro__:
            adapter = _ADAPTERS.get(klass.__name__)
            if adapter is not None:
                return adapter
    return None


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
            m for m in state.host.modules() if is_instance_of(m, self.adapter.attention_classes)
        ]
        method = self.adapter.method
        for layer_key, module in enumerate(modules):
            saved = module.__dict__.get(method)
            replacement = _guard_extra_arguments(self.adapter, getattr(module, method))
            module.__dict__[LINK] = LayerLink(state, layer_key)
            setattr(module, method, types.MethodType(replacement, module))
            self.patched.append((module, saved))

    def uninstall(self, state):
        method = self.adapter.method
        for module, saved in self.patched:
            delattr(module, method)
            del module.__dict__[LINK]
            if saved is not None:
                setattr(module, method, saved)
        self.patched = []

    def channel(self, state, kwargs):
        """The running forward's SinkKV (set by ``main``), or None."""
        return state.channel

    def decoder_layers(self, state):
        """The decoder layers (``adapter.layer_classes``) in model order."""
        return [m for m in state.host.modules() if is_instance_of(m, self.adapter.layer_classes)]

    def sink_input(self, state, embeds):
        sink_input = self.adapter.sink_input
        return embeds if sink_input is None else sink_input(state.model, embeds)

    def run_sink_row(self, state, layer, layer_forward, hidden, position_ids, collector):
        """The sink's row (1, 1, d) through one decoder layer's forward -> its output (1, 1, d),
        the attention reading ``collector`` meanwhile.

        Checkpoints inside the layer (LLaDA's fine-grained strategy) are bypassed for the row:
        one token saves nothing, and their recomputation would run after the channel is back."""
        running, state.channel = state.channel, collector
        switched = []
        for module in layer.modules():
            if module.__dict__.get("_activation_checkpoint_fn") is not None:
                switched.append((module, module._activation_checkpoint_fn))
                module._activation_checkpoint_fn = _call_directly
        try:
            return self.adapter.run_sink_row(layer_forward, hidden, position_ids, state.host)
        finally:
            state.channel = running
            for module, function in switched:
                module._activation_checkpoint_fn = function

    def main(self, state, channel, args, kwargs):
        # Left set after the call: gradient checkpointing re-runs the layers during backward.
        channel.block, channel.key_padding = getattr(state, "block_cache", None) or (None, None)
        state.channel = channel
        return state.original_forward(*args, **kwargs)

    def attention_layers(self, state):
        return [module for module, _ in self.patched]


def _call_directly(function, *args, **kwargs):
    """Stands in for a checkpoint function during the sink's row: runs ``function`` as is."""
    return function(*args, **kwargs)


def _guard_extra_arguments(adapter, original):
    """adapter.replacement, taking every keyword ``original`` takes (see the module docstring)."""
    implemented = {
        name
        for name, p in inspect.signature(adapter.replacement).parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    params = inspect.signature(original).parameters
    defaults = {name: p.default for name, p in params.items() if p.kind is not p.VAR_KEYWORD}
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params.values())

    def replacement(module, *args, **kwargs):
        for name in kwargs.keys() - implemented:
            if name not in defaults and not open_ended:
                raise TypeError(
                    f"{type(module).__name__}.{adapter.method}() got an unexpected keyword "
                    f"argument {name!r}"
                )
            value = kwargs.pop(name)
            if value is not None and value is not False and value is not defaults.get(name):
                raise NotImplementedError(
                    f"sinkdlm's {adapter.name} sink attention does not implement {name}= "
                    f"(got {type(value).__name__}); call the model without it"
                )
        return adapter.replacement(module, *args, **kwargs)

    return replacement


def _no_kv_cache(past):
    if past is not None:
        raise NotImplementedError(
            "KV caches are not supported with the sink token (diffusion LMs "
            "re-run the whole sequence); pass use_cache=False"
        )


def _rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _attend(module, layer_key, sink, q, k, v, **kwargs):
    """Sink attention of the layer's queries over ``k``/``v``, with the layer's sink when the
    model has one, under the autocast rule."""
    sink_kv = sink.kv.get(layer_key)
    if sink_kv is None:
        return observed_sink_attention(module, layer_key, *autocast_inputs(q, k, v), **kwargs)
    return observed_sink_attention(module, layer_key, *autocast_inputs(q, k, v, *sink_kv), **kwargs)


# ----- LLaDA (modeling_llada.py): LLaDABlock.attention(q, k, v, attention_bias, layer_past,
# use_cache) takes the projected (B, T, C) q/k/v, applies rotary itself (positions 0..T-1, no
# position_ids) and calls SDPA with attention_bias as its mask (dLLM's copy; GSAI-ML's and
# Fast-dLLM's pass none). The model builds that bias from attention_mask: (B, 1, L, L) additive,
# large negative on padded keys. Its key padding is used; a bias that is more (causal) is refused.


def _llada_key_padding(sink, attention_bias, batch, length):
    """Key padding (B, L) behind LLaDA's attention_bias, decoded (and checked) once per forward:
    every block receives the same tensor."""
    if attention_bias is None:
        return None
    memo = sink.memo.get("llada_key_padding")
    if memo is not None and memo[0] is attention_bias:
        return memo[1]
    bias = attention_bias if attention_bias.dim() == 4 else attention_bias[None, None]
    key_padding = key_padding_from_sdpa_mask(
        bias[:, :, :length, :length], batch, length, "LLaDA sink attention (attention_bias)"
    )
    sink.memo["llada_key_padding"] = (attention_bias, key_padding)
    return key_padding


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
        block = sink.block
        if config.rope and (block is None or block.refreshing):
            q, k = module.rotary_emb(q, k)
        elif config.rope:  # the fed tokens sit at block.query_start ..
            q, k = _llada_rotary_from(module, q, k, block.query_start)
        if block is not None:
            k, v = block.update(layer_key, k, v)
        if block is not None and not block.refreshing:
            # A cached step feeds fewer tokens than there are keys: the model was given no
            # mask (its bias would be Lq x Lq); the sampler's key padding comes through the channel.
            key_padding = sink.key_padding
        else:
            key_padding = _llada_key_padding(sink, attention_bias, batch, length)
        out = _attend(module, layer_key, sink, q, k, v, key_padding_mask=key_padding)
        out = out.transpose(1, 2)
    return module.attn_out(out.reshape(batch, length, width)), present


def _llada_rotary_from(module, q, k, start):
    """LLaDA's rotary (its own tables and formula) for q and k of tokens at positions ``start ..
    start + L - 1`` (its rotary_emb puts the queries at the end of the keys instead)."""
    rope = module.rotary_emb
    full_precision = getattr(module.config, "rope_full_precision", True)
    q_, k_ = (q.float(), k.float()) if full_precision else (q, k)
    end = start + q.shape[-2]
    sin, cos = rope.get_rotary_embedding(end, q_.device)
    sin, cos = sin.type_as(q_)[:, :, start:end], cos.type_as(q_)[:, :, start:end]
    q_ = rope.apply_rotary_pos_emb(sin, cos, q_)
    k_ = rope.apply_rotary_pos_emb(sin, cos, k_)
    return q_.type_as(q), k_.type_as(k)


def _llada_sink_row(layer_forward, hidden, position_ids, model):
    # LLaDA derives rotary positions from the length; the adapter rotates the sink K itself.
    return layer_forward(hidden, attention_bias=None, layer_past=None, use_cache=False)[0]


def _llada_sink_input(model, embeds):
    """What LLaDA's model does to its embeddings before the first block (OLMo's input_emb_norm
    scaling, the embedding dropout)."""
    llada = model.model
    if llada.config.input_emb_norm:
        embeds = embeds * llada.config.d_model**0.5
    return llada.transformer.emb_drop(embeds)


def _llada_sampler_kwargs(tokens, attention_mask, positions):
    # LLaDA takes no positions (its attention rotates at the cache's positions) and ignores
    # padding, as the uncached sampler's calls do.
    kwargs = dict(input_ids=tokens, use_cache=False)
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    return kwargs


register_adapter(
    SinkAdapter(
        name="LLaDA",
        attention_classes=("LLaDALlamaBlock", "LLaDASequentialBlock"),
        method="attention",
        replacement=_llada_attention,
        layer_classes=("LLaDALlamaBlock", "LLaDASequentialBlock"),
        run_sink_row=_llada_sink_row,
        sink_input=_llada_sink_input,
        final_norm=lambda model: model.model.transformer.ln_f,
        sampler_kwargs=_llada_sampler_kwargs,
    )
)


# ----- Dream (modeling_dream.py): DreamAttention / DreamSdpaAttention.forward(hidden_states,
# attention_mask, position_ids, past_key_value, output_attentions, use_cache, cache_position,
# position_embeddings) -> (out, weights, past); Qwen2-shaped, rotary from position_embeddings.
# Dream passes a (B, 1, L, L) mask (or a (B, L) one) straight to SDPA; its key padding is used.
# The sink's key is rotated from the sink position by the layer's own rotary module: copies such
# as Fast-dLLM's number the positions 0..L-1 whatever position_ids the sink pass passes.


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
):
    _no_kv_cache(past_key_value)
    batch, length, _ = hidden_states.shape
    shape = (batch, length, -1, module.head_dim)
    q = module.q_proj(hidden_states).view(shape).transpose(1, 2)
    k = module.k_proj(hidden_states).view(shape).transpose(1, 2)
    v = module.v_proj(hidden_states).view(shape).transpose(1, 2)
    sink, layer_key, sink_position = layer_sink(module)
    if sink.collect:
        cos, sin = _dream_sink_rotation(module, v, position_embeddings, sink_position)
    else:
        cos, sin = (
            module.rotary_emb(v, position_ids)
            if position_embeddings is None
            else position_embeddings
        )
    q, k = _dream_rope(module, q, k, cos, sin)
    if sink.collect:
        sink.kv[layer_key] = (k[0, :, 0], v[0, :, 0])
        out = expand_sink_output(v, q.shape[1])
    else:
        block = sink.block
        if block is not None:  # Dream's rotary already used the fed tokens' position_ids
            k, v = block.update(layer_key, k, v)
        if block is not None and not block.refreshing:  # the model got no mask (see LLaDA's)
            key_padding_mask = sink.key_padding
        else:
            key_padding_mask = _dream_key_padding(attention_mask, batch, length)
        segment_ids = _dream_segments(sink, position_ids, batch, length, k.shape[2])
        out = _attend(
            module,
            layer_key,
            sink,
            q,
            k,
            v,
            key_padding_mask=key_padding_mask,
            segment_ids=segment_ids,
        )
        out = out.transpose(1, 2)
    return module.o_proj(out.reshape(batch, length, -1)), None, past_key_value


def _dream_segments(sink, position_ids, batch, q_len, k_len):
    """Packed rows behind Dream's position_ids (restarting at each document), decoded once per
    forward; None when every row is one sequence."""
    memo = sink.memo.get("dream_segments")
    if memo is not None and memo[0] is position_ids:
        return memo[1]
    segments = segment_ids_from_packing(
        position_ids, None, None, batch, q_len, k_len, "Dream sink attention"
    )
    sink.memo["dream_segments"] = (position_ids, segments)
    return segments


def _dream_rope(module, q, k, cos, sin):
    # Dream's own rotary helper when its module has one (it is Qwen2's formula either way)
    rope = getattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb", None)
    if rope is not None:
        return rope(q, k, cos, sin)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _dream_sink_rotation(module, value, position_embeddings, sink_position):
    """(cos, sin) at the sink position for the sink pass, from the layer's rotary module; without
    one, the model's position_embeddings, refused if the model placed the sink at position 0."""
    rotary = getattr(module, "rotary_emb", None)
    if rotary is not None:
        position = torch.full((1, 1), sink_position, dtype=torch.long, device=value.device)
        return rotary(value, position)
    if position_embeddings is None:
        raise ValueError(
            f"{type(module).__name__} received neither position_embeddings nor a rotary_emb "
            "module: sinkdlm cannot place the sink at its rotary position"
        )
    cos, sin = position_embeddings
    if sink_position != 0 and bool((cos == 1).all()):
        raise ValueError(
            f"the model rotated the sink at position 0, not at sink_position={sink_position}: "
            "it ignores position_ids (as Fast-dLLM's Dream does), so its attention layers need a "
            "rotary_emb module for sinkdlm to rotate the sink itself"
        )
    return cos, sin


def _dream_sink_row(layer_forward, hidden, position_ids, model):
    # The model's rotary tables at the sink position, as its forward makes them from position_ids;
    # the attention prefers its own rotary module (see _dream_sink_rotation).
    rotary_emb = getattr(model, "rotary_emb", None)
    rotary = None if rotary_emb is None else rotary_emb(hidden, position_ids)
    out = layer_forward(
        hidden, position_ids=position_ids, position_embeddings=rotary, use_cache=False
    )
    return out[0]


def _dream_sampler_kwargs(tokens, attention_mask, positions):
    kwargs = dict(input_ids=tokens, position_ids=positions.expand(tokens.shape[0], -1))
    if attention_mask is not None:  # Dream's attention takes 4-D masks: (B, 1, 1, T) key padding
        kwargs["attention_mask"] = attention_mask.bool()[:, None, None, :]
    return kwargs


register_adapter(
    SinkAdapter(
        name="Dream",
        attention_classes=("DreamAttention", "DreamSdpaAttention"),
        method="forward",
        replacement=_dream_forward,
        layer_classes=("DreamDecoderLayer",),
        run_sink_row=_dream_sink_row,
        final_norm=lambda model: model.model.norm,
        sampler_kwargs=_dream_sampler_kwargs,
    )
)
