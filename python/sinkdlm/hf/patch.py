"""add_sink_token / remove_sink_token: one learned sink token for a Hugging Face DLM.

How it works. The sink attends only to itself, so its hidden state in every layer depends on its
embedding alone. Each decoder layer's call of the patched model therefore runs the sink's row
(rotary position ``sink_position``) with the user's batch: where the backend can fold it
(hf/native.py's ``run_folded``), the row is appended to every sequence of the layer's input and
the attention takes the sink K/V from that position (o = V there) for ``sinkdlm.sink_attention``
over the tokens; otherwise the row first runs alone, batch 1 and length 1, with the attention in
"sink mode" (o = V, the layer's sink K/V recorded), then the batch. The sink's output goes on
to the next layer's call. One module call per layer and forward, as without the sink: sharded
data parallel (FSDP2, FSDP1) gathers each layer's parameters once for the forward and once for
the backward (hf/layer.py says how the sink's path stays inside each call's hooks). It is one
autograd graph, so gradients reach the sink embedding; under ``sink_kv_cache`` inference forwards
reuse the sink K/V while the weights are unchanged and run no sink row.

How the attention layers are reached depends on the architecture: hf/registry.py picks the native
backend (hf/native.py) or a remote-code adapter (hf/adapters.py). This module does the rest, the
same for both: the sink embedding, the wrapped model and layer forwards, the cache and the
checkpointing guards.
"""

import contextlib
import types
import warnings

import torch

from .. import _checks
from .checkpoint import SINK_MODULE, saved_sink_weight
from .layer import SinkKV, sink_layer_call
from .registry import backend_for

_STATE = "_sinkdlm_state"
_FORMAT = 1


class SinkEmbedding(torch.nn.Module):
    """A one-row embedding table holding the learned sink token; ``weight`` is (hidden_size,).

    forward(ids) with ids all 0, shape (*S) -> (*S, hidden_size). It is a module (not a bare
    parameter) so PEFT can list it in ``modules_to_save``.
    """

    def __init__(self, weight):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)

    def forward(self, ids):
        return torch.nn.functional.embedding(ids, self.weight.unsqueeze(0))


class _SinkState:
    """What add_sink_token changed on one model, and the sink K/V cache."""

    def __init__(self, model, host, backend, sink_position):
        self.model = model
        self.host = host
        self.backend = backend
        self.sink_position = sink_position
        self.had_instance_forward = "forward" in host.__dict__
        self.original_forward = host.forward
        self.channel = None  # adapters: the SinkKV the patched attention methods read
        self.requires_grad = None  # flags saved by train_only_sink
        self.cache_depth = 0
        self.cache_key = None
        self.cache_kv = None
        self.original_attn = None  # native backend: the attention implementation to restore
        self.layers = []  # the decoder layers whose forward runs the sink row (in model order)


LAYER_CALL = "_sinkdlm_layer_call"


class _LayerCall:
    """Stored in a patched decoder layer's ``__dict__`` (so ``copy.deepcopy`` rebinds it): the
    model's state, the layer's place in the model, and the forward it had before."""

    def __init__(self, state, index, layer):
        self.state = state
        self.index = index
        self.had_instance_forward = "forward" in layer.__dict__
        self.original = layer.forward


def _unwrap(model):
    """The transformers model under PEFT, DDP/FSDP (``.module``) and torch.compile wrappers."""
    while True:
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            inner = model.get_base_model()
        elif hasattr(model, "_orig_mod"):
            inner = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel) or (
            type(model).__name__ == "FullyShardedDataParallel" and hasattr(model, "module")
        ):
            inner = model.module
        else:
            return model
        if inner is model:
            return model
        model = inner


def _host(model):
    host = getattr(model, "base_model", model)
    return host if isinstance(host, torch.nn.Module) else model


def _state(model):
    return getattr(_host(_unwrap(model)), "__dict__", {}).get(_STATE)


def has_sink_token(model) -> bool:
    """True if ``add_sink_token`` patched this model (PEFT / DDP / compiled wrappers allowed)."""
    return _state(model) is not None


def attention_layers(model) -> list:
    """The attention modules of a model patched by :func:`add_sink_token`, in layer order.

    These are what ``sinkdlm.analysis.AttentionRecorder`` hooks: while it records, each module's
    ``attention_observer`` receives what the layer saw (q, k, v, lse, the sink K/V).
    """
    state = _state(model)
    if state is None:
        raise TypeError(
            f"{type(model).__name__} carries no sink token: call sinkdlm.hf.add_sink_token(model) "
            "first (recording hooks sinkdlm's attention)"
        )
    return state.backend.attention_layers(state)


def _full(tensor):
    """A DTensor (a parameter sharded by FSDP2) gathered whole on every rank; else ``tensor``."""
    full_tensor = getattr(tensor, "full_tensor", None)
    return tensor if full_tensor is None else full_tensor()


def _gathered(param):
    """A context in which a parameter partitioned by DeepSpeed ZeRO-3 (``ds_id``: loaded under
    ``deepspeed.zero.Init``) holds its whole value on every rank (a collective: every rank
    enters it); a no-op for any other parameter."""
    if not hasattr(param, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([param], modifier_rank=None)


def _initial_weight(model, init):
    param = model.get_input_embeddings().weight
    with _gathered(param):  # each branch returns a new tensor: the gathered one is freed after
        table = _full(param.detach())
        if init == "mean":
            return table.float().mean(dim=0).to(table.dtype)
        if init == "zeros":
            return torch.zeros_like(table[0])
        if isinstance(init, int) and not isinstance(init, bool):
            if not 0 <= init < table.shape[0]:
                raise ValueError(
                    f"init token id {init} is outside the vocabulary [0, {table.shape[0]})"
                )
            return table[init].clone()
    raise ValueError(f"init must be 'mean', 'zeros' or a token id (int), got {init!r}")


def add_sink_token(model, *, sink_position=-1, init="mean", train_only_sink=False):
    """Gives a Hugging Face diffusion LM one learned sink token; returns the same model.

    Nothing else in a training script changes: same input_ids (B, L), attention_mask, labels and
    logits (B, L, V). Adds ``sink_embedding.weight`` (hidden_size,) to the base model (seen by
    optimizers, state_dict, FSDP, PEFT), routes every attention layer through
    ``sinkdlm.sink_attention`` (bidirectional), and records ``config.sinkdlm``.

    Args:
        model: a transformers model (Llama / Mistral / Qwen2 / Qwen3 families, or a remote-code
            model with a registered adapter: LLaDA, Dream), possibly wrapped by PEFT.
        sink_position: rotary position of the sink; the user's tokens keep positions 0..L-1. -1 is
            the paper's model (sink at 0, tokens shifted by one: rotary depends only on offsets).
        init: "mean" (mean input embedding), "zeros", or a token id whose embedding is copied.
            Ignored when the model was loaded from a checkpoint saved with the sink token: the
            saved embedding is used.
        train_only_sink: freeze every other parameter (remove_sink_token restores the flags).

    A second call on a patched model does nothing.
    """
    if has_sink_token(model):
        return model
    inner = _unwrap(model)
    if not isinstance(inner, torch.nn.Module):
        expected = "a transformers model (a torch.nn.Module)"
        _checks.fail("add_sink_token", "model", expected, _checks.describe(model), TypeError)
    host = _host(inner)
    backend = backend_for(inner, host)  # first: it names what is supported when this is not
    recorded = getattr(inner.config, "sinkdlm", None)
    saved = None
    if isinstance(recorded, dict):
        if sink_position not in (-1, recorded["sink_position"]):
            raise ValueError(
                f"this checkpoint was trained with sink_position="
                f"{recorded['sink_position']}, got sink_position={sink_position}"
            )
        sink_position = recorded["sink_position"]
        saved = saved_sink_weight(inner)
        if saved is None:
            warnings.warn(
                "config.sinkdlm is set but no saved sink embedding was found next to the "
                f"checkpoint; initialising it with init={init!r}",
                stacklevel=2,
            )
    sink_position = _checks.integer("add_sink_token", "sink_position", sink_position)
    _refuse_wrapped_first(model, inner)  # before reading the embedding table
    weight = _initial_weight(inner, init)
    if saved is not None:
        if saved.shape != weight.shape:
            raise ValueError(
                f"saved sink embedding has shape {tuple(saved.shape)}, the model's "
                f"hidden size needs {tuple(weight.shape)}"
            )
        weight = saved.to(device=weight.device, dtype=weight.dtype)
    state = _SinkState(inner, host, backend, sink_position)
    layers = backend.decoder_layers(state)
    if not layers:
        raise ValueError(
            f"sinkdlm found no decoder layers in {type(inner).__name__} to run the sink row through"
        )
    backend.install(state)  # first: if it refuses the model, nothing has changed yet
    host.add_module(SINK_MODULE, SinkEmbedding(weight))
    _shard_like_the_model(inner, getattr(host, SINK_MODULE))
    host.__dict__[_STATE] = state
    for index, layer in enumerate(layers):
        layer.__dict__[LAYER_CALL] = _LayerCall(state, index, layer)
        layer.forward = types.MethodType(_layer_forward, layer)
    state.layers = layers
    # A method bound to the host, its state in the host's __dict__: copy.deepcopy of the model
    # rebinds both to the copy.
    host.forward = types.MethodType(_patched_forward, host)
    inner.config.sinkdlm = {
        "format": _FORMAT,
        "sink_position": sink_position,
        "backend": backend.name,
    }
    if train_only_sink:
        sink_weight = getattr(host, SINK_MODULE).weight
        state.requires_grad = {p: p.requires_grad for p in inner.parameters()}
        for p in inner.parameters():
            p.requires_grad_(p is sink_weight)
    return model


def remove_sink_token(model):
    """Undoes add_sink_token: original forward, attention and requires_grad flags; returns model."""
    state = _state(model)
    if state is None:
        return model
    host = state.host
    state.backend.uninstall(state)
    for layer in state.layers:
        call = layer.__dict__.pop(LAYER_CALL)
        del layer.forward
        if call.had_instance_forward:
            layer.forward = call.original
    del host.forward
    if state.had_instance_forward:
        host.forward = state.original_forward
    if state.requires_grad is not None:
        for p, flag in state.requires_grad.items():
            p.requires_grad_(flag)
    delattr(host, SINK_MODULE)
    del host.__dict__[_STATE]
    if hasattr(state.model.config, "sinkdlm"):
        del state.model.config.sinkdlm
    return model


def _reentrant(func):
    return getattr(func, "keywords", {}).get("use_reentrant") is True


def _reject_reentrant_checkpointing(host):
    """A reentrant checkpoint runs its layer without gradients and replays the layer's backward
    on its own, outside the graph that links one layer's sink row to the next (hf/layer.py); only
    non-reentrant checkpointing composes with the sink.

    OLMo-style models (LLaDA) checkpoint through their own ``_activation_checkpoint_fn``; the
    ``_gradient_checkpointing_func`` transformers stores on them is never called."""
    for module in host.modules():
        if "_activation_checkpoint_fn" in module.__dict__:
            used = module.__dict__["_activation_checkpoint_fn"]
        elif module.__dict__.get("gradient_checkpointing") is True:
            used = module.__dict__.get("_gradient_checkpointing_func")
        else:
            continue
        if _reentrant(used):
            raise ValueError(
                "the sink token needs non-reentrant gradient checkpointing: enable it with "
                "gradient_checkpointing_kwargs={'use_reentrant': False} (transformers 5's default; "
                "4.x defaults to reentrant)"
            )


def _patched_forward(host, *args, **kwargs):
    state = host.__dict__[_STATE]
    grad = torch.is_grad_enabled()
    compiling = torch.compiler.is_compiling()
    if host.training and grad and not compiling:
        _reject_reentrant_checkpointing(host)
    # Inside sink_kv_cache, a forward without gradients reuses the K/V of the last one that ran
    # with the same weights.
    caching = state.cache_depth > 0 and not grad and not compiling
    key = _weights_key(state) if caching else None
    if caching and state.cache_key == key:
        channel = SinkKV(state.cache_kv, given=True)
    else:
        channel = SinkKV()
    out = state.backend.main(state, channel, args, kwargs)
    if caching and not channel.given:
        state.cache_kv, state.cache_key = channel.kv, key
    return out


def _layer_forward(layer, *args, **kwargs):
    """A patched decoder layer's forward: the sink row, then the layer's own forward on the batch
    (hf/layer.py); as before when the forward carries no sink (the K/V given, a sink row)."""
    call = layer.__dict__[LAYER_CALL]
    state = call.state
    channel = state.backend.channel(state, kwargs)
    if channel is None or channel.collect or channel.given:
        return call.original(*args, **kwargs)
    batch_in = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))

    def run_layer(sink_in):
        # One pass over the layer's weights for the sink's row and the batch where the backend
        # can: a separate one-row pass reads every weight matrix once more, and its backward adds
        # a full-size rank-1 weight gradient (17% of a ~100M model's step at B.L = 1x128).
        folded = getattr(state.backend, "run_folded", None)
        out = None if folded is None else folded(state, layer, call, channel, sink_in, args, kwargs)
        if out is not None:
            return out
        sink_out = _sink_row(state, layer, call, sink_in, channel)
        return call.original(*args, **kwargs), sink_out

    return sink_layer_call(channel, call.index, batch_in, lambda: _embed_sink(state), run_layer)


def _embed_sink(state):
    """The sink's input to the first decoder layer, (1, 1, hidden_size)."""
    sink = getattr(state.host, SINK_MODULE)
    ids = torch.zeros(1, 1, dtype=torch.long, device=next(sink.parameters()).device)
    return state.backend.sink_input(state, sink(ids))


def _sink_row(state, layer, call, hidden, channel):
    """The sink's row (1, 1, d) through one decoder layer; records its K/V in ``channel.kv``."""
    collector = SinkKV(channel.kv, collect=True)
    collector.memo = channel.memo
    position_ids = torch.full((1, 1), state.sink_position, dtype=torch.long, device=hidden.device)
    return state.backend.run_sink_row(state, layer, call.original, hidden, position_ids, collector)


def _local(param):
    return getattr(param, "_local_tensor", param)  # a DTensor's shard on this rank


def _weights_key(state):
    params = tuple((_local(p).data_ptr(), p._version) for p in state.host.parameters())
    autocast = tuple(torch.is_autocast_enabled(d) for d in ("cpu", "cuda"))
    return params, autocast, state.host.training


def _refuse_wrapped_first(model, inner):
    """FSDP1 flattens the parameters it wraps: a sink embedding added afterwards would be left out
    of its sharding and gradient reduction. A DeepSpeed ZeRO-3 engine (``deepspeed.initialize``,
    the Trainer's training set-up) registers its modules' gather hooks and its optimizer's
    partitions once: a parameter added later would have neither. A model only partitioned by
    ``deepspeed.zero.Init`` (``from_pretrained`` under a ZeRO-3 config) is accepted: the engine
    partitions the sink embedding with the rest when it is built."""
    wrapped = [model, *inner.modules()]
    if any(type(m).__name__ == "FullyShardedDataParallel" for m in wrapped):
        raise ValueError(
            "add_sink_token must run before wrapping the model in FSDP1 "
            "(FullyShardedDataParallel): patch first, then wrap (FSDP2's fully_shard accepts "
            "either order)"
        )
    if any(hasattr(m, "ds_id") for m in wrapped):  # set on modules by the engine only
        raise ValueError(
            "add_sink_token must run before a DeepSpeed ZeRO-3 engine wraps the model: patch, "
            "then deepspeed.initialize / Trainer (a model loaded under deepspeed.zero.Init may "
            "be patched: the engine partitions the sink embedding with the rest)"
        )


def _shard_like_the_model(model, sink_module):
    """Model already sharded by FSDP2 (its embedding a DTensor): the sink embedding, added after
    fully_shard, becomes its own FSDP unit on the same mesh (one more, small, all-gather per
    forward than patching before fully_shard, where it shards with the root's parameters)."""
    table = model.get_input_embeddings().weight
    mesh = getattr(table, "device_mesh", None)
    if mesh is None:
        return
    from torch.distributed.fsdp import fully_shard

    fully_shard(sink_module, mesh=mesh)


@contextlib.contextmanager
def sink_kv_cache(model):
    """Inside this context, forwards without gradient compute the sink K/V once and reuse them.

    A sampler's many forwards then pay for the sink rows once. The cache is keyed by every
    parameter's storage and version counter (so an optimizer step, load_state_dict or .to()
    invalidates it) and dropped when the outermost context exits. Forwards with gradients enabled
    always recompute (their graph must reach the sink embedding). Weights changed through
    ``.data`` bypass version counters and are not noticed. On a model without the sink token
    this does nothing, so samplers can use it unconditionally.
    """
    state = _state(model)
    if state is None:
        yield model
        return
    state.cache_depth += 1
    try:
        yield model
    finally:
        state.cache_depth -= 1
        if state.cache_depth == 0:
            state.cache_key = state.cache_kv = None
