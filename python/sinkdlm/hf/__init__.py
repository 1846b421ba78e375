"""Hugging Face integration: give a transformers diffusion LM the sink token, train, save, reload.

model = sinkdlm.hf.add_sink_token(model)   # one call; nothing else in the script changes
model.save_pretrained(path)
model = sinkdlm.hf.from_pretrained(path)   # same model back (sink embedding included)
"""

from ..block_cache import register_block_forward
from . import native
from .adapters import SinkAdapter, register_adapter
from .block_cache import find_block_forward
from .patch import (
    add_sink_token,
    attention_layers,
    has_sink_token,
    remove_sink_token,
    sink_kv_cache,
)
from .shims import from_pretrained

native.register()
register_block_forward(find_block_forward)  # sinkdlm.generate's block forward and cache

__all__ = [
    "SinkAdapter",
    "add_sink_token",
    "attention_layers",
    "from_pretrained",
    "has_sink_token",
    "register_adapter",
    "remove_sink_token",
    "sink_kv_cache",
]
