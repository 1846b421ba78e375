"""sinkdlm.generate's block forward for Hugging Face models (see sinkdlm.block_cache).

transformers-native models (anything whose forward takes ``logits_to_keep``: Llama, Qwen2, Qwen3,
Mistral, ..., with or without the sink token) run their own forward: sinkdlm's Cache subclass,
:class:`BlockCache`, is passed as the model's cache, so the model's embeddings, rotary, masks and
attention do the work. While the cache steps it reports ``query_start`` as the number of tokens
already seen, which is what transformers turns into the queries' positions and mask offset, and
the whole sequence as the keys' length; each attention layer's ``cache.update`` hands back the
cached K/V with the fed tokens' rows fresh. The LM head runs on the kept positions only through
the model's own ``logits_to_keep`` (a 1-D tensor of positions).

Remote-code models with an adapter (LLaDA, Dream: hf/adapters.py) run through the adapter's
attention replacement, which reads the BlockKVCache from the layers' channel. With the sink
token it is installed already; without it, it is installed for the duration of each cached
forward, with no sink. Their forwards have no way to keep some logits, so the head's input is
restricted instead: a forward hook on the final norm (the adapter's ``final_norm``) returns the
kept positions of its output only.
"""

import contextlib
import inspect

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin

from ..block_cache import BlockKVCache
from .adapters import AdapterBackend, adapter_for
from .layer import SinkKV
from .patch import _host, _state, _unwrap


class _BlockLayer(CacheLayerMixin):
    """One layer's view of the BlockKVCache."""

    is_compileable = False
    is_sliding = False

    def __init__(self, block: BlockKVCache, layer: int):
        super().__init__()
        self.block, self.layer = block, layer
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states):
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        return self.block.update(self.layer, key_states, value_states)

    def get_mask_sizes(self, query_length):
        block = self.block
        return (query_length if block.refreshing else block.length), 0

    def get_seq_length(self):
        return 0 if self.block.refreshing else self.block.query_start

    def get_max_length(self):
        return -1


class BlockCache(Cache):
    """transformers ``Cache`` over a :class:`sinkdlm.block_cache.BlockKVCache`.

    Args:
        block: the sampler's BlockKVCache (its phase decides what a forward does).
        num_layers: the model's number of attention layers.
    """

    def __init__(self, block: BlockKVCache, num_layers: int):
        super().__init__(layers=[_BlockLayer(block, i) for i in range(num_layers)])
        self.block = block


def _forward_parameters(model) -> set:
    return set(inspect.signature(type(model).forward).parameters)


class NativeBlockForward:
    """The block forward of a transformers-native model (see sinkdlm.block_cache)."""

    def __init__(self, model, parameters):
        self.model = model
        # transformers 5.x renamed the forward's past_key_values to cache.
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self.num_layers = model.config.num_hidden_layers
        self.view = None  # the BlockCache over the current call's BlockKVCache

    def __call__(self, tokens, attention_mask, *, cache, keep):
        kwargs = dict(input_ids=tokens, logits_to_keep=keep, use_cache=cache is not None)
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if cache is not None:
            if self.view is None or self.view.block is not cache:
                self.view = BlockCache(cache, self.num_layers)
            kwargs[self.cache_argument] = self.view
        return self.model(**kwargs).logits


@contextlib.contextmanager
def _kept_head_input(norm, keep):
    """While active, ``norm``'s output is cut to the ``keep`` positions (dim 1)."""

    def cut(module, args, output):
        return output[:, keep]

    handle = norm.register_forward_hook(cut)
    try:
        yield
    finally:
        handle.remove()


class _CacheOnlyState:
    """What an adapter's replacement reads on a model without the sink token: no sink, the
    sampler's BlockKVCache and key padding."""

    def __init__(self, host, block, key_padding):
        self.host = host
        self.channel = SinkKV(block=block, key_padding=key_padding)
        self.sink_position = 0


@contextlib.contextmanager
def _through_cache(model, adapter, block, key_padding):
    """The model's attention runs through ``block`` (``key_padding``: (B, T) bool or None): for a
    model with the sink token its adapter reads both from the state; without one, the adapter is
    installed (no sink) for now."""
    state = _state(model)
    if state is not None:
        state.block_cache = (block, key_padding)
        try:
            yield
        finally:
            state.block_cache = None
        return
    backend = AdapterBackend(adapter)
    cache_state = _CacheOnlyState(_host(model), block, key_padding)
    backend.install(cache_state)
    try:
        yield
    finally:
        backend.uninstall(cache_state)


class AdapterBlockForward:
    """The block forward of a remote-code model with an adapter (see the module docstring)."""

    def __init__(self, model, adapter):
        self.model, self.adapter = model, adapter
        self.final_norm = adapter.final_norm(_unwrap(model))

    def __call__(self, tokens, attention_mask, *, cache, keep):
        start = 0 if cache is None else cache.query_start
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        # A cached step feeds fewer tokens than the mask covers: the model gets none (LLaDA builds
        # an L x L bias from it), the attention the key padding through the layers' channel.
        stepping = cache is not None and not cache.refreshing
        model_mask = None if stepping else attention_mask
        kwargs = self.adapter.sampler_kwargs(tokens, model_mask, positions[None])
        through = contextlib.nullcontext()
        if cache is not None:
            key_padding = None if attention_mask is None else attention_mask.bool()
            through = _through_cache(self.model, self.adapter, cache, key_padding)
        with through, _kept_head_input(self.final_norm, keep):
            return self.model(**kwargs).logits


def find_block_forward(model):
    """The block forward of a Hugging Face model, or None for one sinkdlm cannot run."""
    if not isinstance(model, PreTrainedModel):
        return None
    adapter = adapter_for(model)
    if adapter is not None and adapter.final_norm is not None:
        return AdapterBlockForward(model, adapter)
    parameters = _forward_parameters(model)
    if "logits_to_keep" in parameters and ({"cache", "past_key_values"} & parameters):
        return NativeBlockForward(model, parameters)
    return None
