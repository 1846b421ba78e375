"""sinkdlm.generate's block forward for Hugging Face models (see sinkdlm.block_cache).

transformers-native models (anything whose forward takes ``logits_to_keep``: Llama, Qwen2, Qwen3,
Mistral, ..., with or without the sink token) run their own forward: sinkdlm's Cache subclass,
:class:`BlockCache`, is passed as the model's cache, so the model's embeddings, rotary, masks and
attention do the work. While the cache steps it reports ``query_start`` as the number of tokens
already seen, which is what transformers turns into the queries' positions and mask offset, and
the whole sequence as the keys' length; each attention layer's ``cache.update`` hands back the
cached K/V with the fed tokens' rows fresh. The LM head runs on the kept positions only through
the model's own ``logits_to_keep`` (a 1-D tensor of positions).
"""

import inspect

from transformers import PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin

from ..block_cache import BlockKVCache


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


def find_block_forward(model):
    """The block forward of a Hugging Face model, or None for one sinkdlm cannot run."""
    if not isinstance(model, PreTrainedModel):
        return None
    parameters = _forward_parameters(model)
    if "logits_to_keep" in parameters and ({"cache", "past_key_values"} & parameters):
        return NativeBlockForward(model, parameters)
    return None

