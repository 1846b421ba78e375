"""The native backend: transformers-native models (AttentionInterface + AttentionMaskInterface).

Models whose attention layers call ``ALL_ATTENTION_FUNCTIONS`` (Llama, Qwen2, Qwen3, Mistral, and
the DLMs built on them) switch to the "sinkdlm" implementation with ``set_attn_implementation``.
The per-forward channel (hf/layer.py's SinkKV) travels to the decoder layers and the attention
function as the keyword argument ``sinkdlm_sink`` (transformers forwards a model's extra keyword
arguments down to every layer and attention call), so torch.compile traces it and gradient
checkpointing replays it. A decoder layer runs the sink's row through its own forward with the
model's rotary tables at the sink position and no mask or cache.
"""

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ..ops import cpu_paths
from ..padding import key_padding_from_model_mask, segment_ids_from_packing
from ..protocol import observed_sink_attention
from .layer import autocast_inputs, expand_sink_output
from .registry import register_patch_path

ATTN_IMPLEMENTATION = "sinkdlm"
SINK_KWARG = "sinkdlm_sink"
# Families whose equivalence with the paper's literal form is tested (Dream is Qwen2-shaped, LLaDA
# Llama-shaped when ported to transformers).
NATIVE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# A KV cache's keyword in a model's or decoder layer's forward, across transformers releases.
CACHE_KWARGS = ("past_key_values", "past_key_value", "cache")


def sinkdlm_attention_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs
):
    """transformers attention function: bidirectional sink attention.

    query (B, H, Lq, D), key/value (B, Hkv, Lk, D) are used as given (no copy, no repeat_kv);
    returns ((B, Lq, H, D) contiguous, None). Lk > Lq under a KV cache (sinkdlm.generate's block
    cache): the queries attend to every key it returns. ``is_causal`` is ignored: DLM attention
    is bidirectional. The sink K/V come from ``kwargs["sinkdlm_sink"]``.

    Packed rows (transformers' DataCollatorWithFlattening): documents are told apart by the
    ``cu_seq_lens_q/k`` keyword arguments when given, else by ``position_ids`` restarting at
    each document (:func:`sinkdlm.padding.segment_ids_from_packing`); each attends to its own
    tokens and the sink. A model path that passes no ``position_ids`` to its attention calls is
    refused: sinkdlm could not tell whether a row holds several documents.
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
    length = key.shape[2] - sink.folded  # the batch's own keys (a folded call adds the sink's)
    if sink.folded:  # the last position of every row is the sink (NativeBackend.run_folded)
        sink.kv[layer_key] = (key[0, :, length].clone(), value[0, :, length].clone())
    window = kwargs.get("sliding_window")
    if window is not None and length > window:
        raise NotImplementedError(
            f"sequence of {length} tokens exceeds this layer's sliding window ({window}); "
            "sink attention is full bidirectional attention"
        )
    query, key, value, sink_k, sink_v = autocast_inputs(query, key, value, *sink.kv[layer_key])
    batch = query.shape[0]
    key_padding = key_padding_from_model_mask(attention_mask, batch, length, "sinkdlm attention")
    segment_ids = _packed_segments(sink, kwargs, batch, query.shape[2] - sink.folded, length)
    if sink.folded:
        segment_ids, key_padding = _fold_masks(
            sink, segment_ids, key_padding, attention_mask, batch, length, query.device
        )
    out = observed_sink_attention(
        module,
        layer_key,
        query,
        key,
        value,
        sink_k,
        sink_v,
        scale=scaling,
        key_padding_mask=key_padding,
        segment_ids=segment_ids,
    )
    return out.transpose(1, 2).contiguous(), None


def _fold_masks(sink, segment_ids, key_padding, attention_mask, batch, length, device):
    """A folded call's segment ids and key padding over its L + 1 positions, once per forward.

    The sink's position L is a document of its own and always real: its query sees only its own
    key and the sink K/V, the same token twice, so its output is exactly its V (o = V), with no
    copy of the attention output to append it; the tokens see it through the sink K/V only.
    """
    memo = sink.memo.get("fold_masks")
    if memo is not None and memo[0] is segment_ids and memo[1] is attention_mask:
        return memo[2]
    tokens = segment_ids
    if tokens is None:
        tokens = torch.zeros(batch, length, dtype=torch.int32, device=device)
    if key_padding is not None:
        key_padding = torch.cat([key_padding, key_padding.new_ones(batch, 1)], dim=1)
    folded = torch.cat([tokens, tokens[:, -1:] + 1], dim=1), key_padding
    sink.memo["fold_masks"] = (segment_ids, attention_mask, folded)
    return folded


def _packed_segments(sink, kwargs, batch, q_len, k_len):
    """Segment ids of packed rows (None: one sequence per row), decoded once per forward: every
    layer receives the same tensors."""
    signals = tuple(kwargs.get(name) for name in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k"))
    if "position_ids" not in kwargs and all(signal is None for signal in signals):
        raise RuntimeError(
            "sinkdlm attention received no position_ids from the model, so it cannot tell "
            "packed documents apart; this model's attention layers do not pass them on"
        )
    memo = sink.memo.get("packed_segments")
    if memo is not None and all(a is b for a, b in zip(memo[0], signals, strict=True)):
        return memo[1]
    segments = segment_ids_from_packing(*signals, batch, q_len, k_len, "sinkdlm attention")
    sink.memo["packed_segments"] = (signals, segments)
    return segments


def _sink_rotary(state, hidden, memo, position_ids=None):
    """The model's rotary tables at the sink's position, (cos, sin) each (1, 1, D); once per
    forward (``memo``)."""
    rotary = memo.get("sink_rotary")
    if rotary is None:
        rotary_emb = getattr(state.host, "rotary_emb", None)
        if rotary_emb is None:
            raise NotImplementedError(
                f"{type(state.host).__name__} has no rotary_emb module: sinkdlm cannot place the "
                "sink at its rotary position"
            )
        if position_ids is None:
            position_ids = torch.full((1, 1), state.sink_position, device=hidden.device)
        rotary = memo["sink_rotary"] = rotary_emb(hidden, position_ids)
    return rotary


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


def folds(layer, args, kwargs):
    """Whether a decoder layer's call runs the sink's row folded into the batch (else alone, one
    row through the layer before the batch).

    Folded where sinkdlm's native CPU kernel runs the attention (the CPU, a dtype whose
    ``backend="auto"`` path is native): there a second pass over the weights for one row costs
    more than 1/L extra tokens (1.13x the unpatched step of a ~100M model under FSDP2 at
    B.L = 1x128, against 1.01-1.04x folded, by CPU time: the README's FSDP table). Not on
    CUDA, where the extra row is cheap beside the batch and L + 1 keys would break the fused
    kernels' tile alignment, nor on the composed CPU path, which runs packed segments through a
    dense bias. Not with a KV cache (it would store the sink's row among the tokens), rotary
    tables not passed by keyword, or an attention observer recording the layer (the attention
    mass takes no segments).
    """
    rotary = kwargs.get("position_embeddings")
    if len(args) > 1 or rotary is None or any(kwargs.get(n) is not None for n in CACHE_KWARGS):
        return False
    hidden = args[0] if args else kwargs["hidden_states"]
    if hidden.device.type != "cpu":
        return False
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else hidden.dtype
    needs_grad = torch.is_grad_enabled()
    if cpu_paths.cpu_auto_backend(cpu_paths.CPU_FEATURES, dtype, needs_grad) != "native":
        return False
    return all(getattr(m, "attention_observer", None) is None for m in layer.modules())


class NativeBackend:
    """transformers-native models: AttentionInterface "sinkdlm", sink K/V passed as a kwarg."""

    name = "attention_interface"

    @classmethod
    def for_model(cls, model):
        """A backend for ``model``, or None if it cannot switch its attention implementation."""
        can_set = getattr(model, "_can_set_attn_implementation", None)  # absent in older releases
        return cls() if can_set is None or can_set() else None

    def install(self, state):
        register()
        state.original_attn = state.model.config._attn_implementation
        state.model.set_attn_implementation(ATTN_IMPLEMENTATION)

    def uninstall(self, state):
        state.model.set_attn_implementation(state.original_attn)

    def channel(self, state, kwargs):
        """The running forward's SinkKV, as a decoder layer's call received it (or None)."""
        return kwargs.get(SINK_KWARG)

    def decoder_layers(self, state):
        """The modules holding each attention layer (the decoder layers), in layer order."""
        parents = {}
        for module in state.host.modules():
            for child in module.children():
                parents[id(child)] = module
        return [parents[id(attention)] for attention in self.attention_layers(state)]

    def sink_input(self, state, embeds):
        return embeds  # the native families feed their embeddings to the first layer unscaled

    def run_sink_row(self, state, layer, layer_forward, hidden, position_ids, collector):
        """The sink's row (1, 1, d) through one decoder layer's forward -> its output (1, 1, d)."""
        out = layer_forward(
            hidden,
            attention_mask=None,
            position_ids=position_ids,
            position_embeddings=_sink_rotary(state, hidden, collector.memo, position_ids),
            use_cache=False,
            **{SINK_KWARG: collector},
        )
        return out[0] if isinstance(out, tuple) else out

    def run_folded(self, state, layer, call, channel, sink_in, args, kwargs):
        """The batch (B, L, d) with the sink's row appended to every sequence, through one call of
        the decoder layer -> (the layer's output over the batch, the sink's output (1, 1, d)), or
        None where the call is not folded (:func:`folds`).

        Position L of each row is the sink, at its rotary position; the attention function
        (``channel.folded``) takes the sink K/V from there and makes it a segment of its own
        (o = V), so the batch's rows see exactly what the separate sink row would have given
        them. The sink's row is computed B times (1/L more tokens) instead of once, in one pass
        over the weights.
        """
        if not folds(layer, args, kwargs):
            return None
        hidden, rotary = args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"]
        batch, length, width = hidden.shape
        sink_rotary = _sink_rotary(state, sink_in, channel.memo)
        memo = channel.memo.get("folded_rotary")
        if memo is None or any(a is not b for a, b in zip(memo[0], rotary, strict=True)):
            folded_rotary = tuple(
                torch.cat([table, sink.to(table.dtype).expand(table.shape[0], 1, -1)], dim=1)
                for table, sink in zip(rotary, sink_rotary, strict=True)
            )
            memo = channel.memo["folded_rotary"] = (rotary, folded_rotary)  # once per forward
        sink_rows = sink_in.to(hidden.dtype).expand(batch, 1, width)
        # A channel of its own, not a flag set for the call's duration: a layer that checkpoints
        # its own forward replays the attention during backward, after the call has returned.
        folded_kwargs = dict(kwargs, position_embeddings=memo[1], **{SINK_KWARG: channel.fold()})
        folded_kwargs["hidden_states"] = torch.cat([hidden, sink_rows], dim=1)
        out = call.original(**folded_kwargs)  # (hidden_states is the first parameter)
        hidden_out = out[0] if isinstance(out, tuple) else out
        batch_out, sink_out = hidden_out[:, :length], hidden_out[:1, length:]
        return ((batch_out, *out[1:]) if isinstance(out, tuple) else batch_out), sink_out

    def main(self, state, channel, args, kwargs):
        """The user's forward, the channel handed to every decoder layer and attention call.

        With no KV cache given, none is made (``use_cache=False`` unless asked for): a diffusion
        LM's forward has no use for one, and the decoder layers can then run the sink's row with
        the batch (:meth:`run_folded`)."""
        if kwargs.get("use_cache") is None and all(kwargs.get(n) is None for n in CACHE_KWARGS):
            kwargs = dict(kwargs, use_cache=False)
        return state.original_forward(*args, **kwargs, **{SINK_KWARG: channel})

    def attention_layers(self, state):
        modules = [
            m
            for m in state.host.modules()
            if type(m).__name__.endswith("Attention") and getattr(m, "layer_idx", None) is not None
        ]
        return sorted(modules, key=lambda m: m.layer_idx)


for _model_type in NATIVE_MODEL_TYPES:
    register_patch_path(_model_type, NativeBackend.for_model)
