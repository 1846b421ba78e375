"""add_sink_token / remove_sink_token: one learned sink token for a Hugging Face DLM.

How it works. The sink attends only to itself, so its hidden state in every layer depends on its
embedding alone. Each forward of the patched model therefore first runs the sink embedding alone
(batch 1, length 1, rotary position ``sink_position``) through the model's own layers with the
attention in "sink mode" (o = V, K/V recorded per layer), then runs the user's sequence unchanged,
every attention layer calling ``sinkdlm.sink_attention`` with that layer's sink K/V. Both passes
are one autograd graph, so gradients reach the sink embedding; under ``sink_kv_cache`` inference
forwards reuse the sink K/V while the weights are unchanged.

How the attention layers are reached depends on the architecture: hf/registry.py picks the native
backend (hf/native.py) or a remote-code adapter (hf/adapters.py). This module does the rest, the
same for both: the sink embedding, the wrapped forward, the cache and the checkpointing guards.
"""

import contextlib
import types
import warnings

import torch

from .. import _checks
from .checkpoint import SINK_MODULE, saved_sink_weight
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


def _initial_weight(model, init):
    table = model.get_input_embeddings().weight
    if init == "mean":
        return table.detach().float().mean(dim=0).to(table.dtype)
    if init == "zeros":
        return torch.zeros_like(table[0]).detach()
    if isinstance(init, int) and not isinstance(init, bool):
        if not 0 <= init < table.shape[0]:
            raise ValueError(
                f"init token id {init} is outside the vocabulary [0, {table.shape[0]})"
            )
        return table[init].detach().clone()
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
    weight = _initial_weight(inner, init)
    if saved is not None:
        if saved.shape != weight.shape:
            raise ValueError(
                f"saved sink embedding has shape {tuple(saved.shape)}, the model's "
                f"hidden size needs {tuple(weight.shape)}"
            )
        weight = saved.to(device=weight.device, dtype=weight.dtype)
    state = _SinkState(inner, host, backend, sink_position)
    backend.install(state)  # first: if it refuses the model, nothing has changed yet
    host.add_module(SINK_MODULE, SinkEmbedding(weight))
    host.__dict__[_STATE] = state
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
    """Reentrant checkpoints replay each layer's backward separately, and each replay would walk
    the shared sink pass again; only non-reentrant checkpointing composes with the sink.

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
    if host.training and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        _reject_reentrant_checkpointing(host)
    return state.backend.main(state, _sink_kv(state), args, kwargs)


def _call_directly(function, *args, **kwargs):
    """Stands in for a checkpoint function during the sink pass: runs ``function`` as is."""
    return function(*args, **kwargs)


@contextlib.contextmanager
def _no_activation_checkpointing(host):
    """The sink pass is one token: checkpointing it saves nothing, and a reentrant checkpoint
    would run it without grad, cutting the sink embedding off from the loss.

    transformers' flag is switched off; OLMo-style checkpoint functions (LLaDA's, per block and
    per model) are replaced by a direct call, since models call them whenever a strategy is set."""
    switched = []
    for module in host.modules():
        if module.__dict__.get("gradient_checkpointing") is True:
            switched.append((module, "gradient_checkpointing", True))
            module.gradient_checkpointing = False
        if module.__dict__.get("_activation_checkpoint_fn") is not None:
            switched.append((module, "_activation_checkpoint_fn", module._activation_checkpoint_fn))
            module._activation_checkpoint_fn = _call_directly
    try:
        yield
    finally:
        for module, name, value in switched:
            setattr(module, name, value)


def _compute_sink_kv(state):
    sink = getattr(state.host, SINK_MODULE)
    device = next(sink.parameters()).device
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    position_ids = torch.full((1, 1), state.sink_position, dtype=torch.long, device=device)
    with _no_activation_checkpointing(state.host):
        return state.backend.sink_pass(state, sink(ids), position_ids)


def _weights_key(state):
    params = tuple((p.data_ptr(), p._version) for p in state.host.parameters())
    autocast = tuple(torch.is_autocast_enabled(d) for d in ("cpu", "cuda"))
    return params, autocast, state.host.training


def _sink_kv(state):
    """Per-layer sink K/V; reused inside sink_kv_cache for gradient-free forwards."""
    if state.cache_depth == 0 or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return _compute_sink_kv(state)
    key = _weights_key(state)
    if state.cache_key != key:
        state.cache_kv = _compute_sink_kv(state)
        state.cache_key = key
    return state.cache_kv


@contextlib.contextmanager
def sink_kv_cache(model):
    """Inside this context, forwards without gradient compute the sink K/V once and reuse them.

    A sampler's many forwards then pay for the sink pass once. The cache is keyed by every
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
