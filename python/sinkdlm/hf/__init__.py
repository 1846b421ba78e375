"""Hugging Face integration: give a transformers diffusion LM the sink token, train, save, reload.

model = sinkdlm.hf.add_sink_token(model)   # one call; nothing else in the script changes
model.save_pretrained(path)
model = sinkdlm.hf.from_pretrained(path)   # same model back (sink embedding included)

patch.py does what every architecture shares (the sink embedding, the wrapped forward, the sink
K/V cache); registry.py maps an architecture to its backend, one file each: native.py
(AttentionInterface, transformers-native families) and adapters.py (remote-code LLaDA, Dream);
layer.py holds what their attention layers share, checkpoint.py finds a saved sink embedding,
shims.py loads remote code written for older transformers and check.py (check_model) compares a
patched model with the paper's literal form. block_cache.py is sinkdlm.generate's forward for
these models (logits only where read, Fast-dLLM's block KV cache).
"""

from ..protocol import register_model_hooks
from . import native
from .adapters import SinkAdapter, register_adapter
from .block_cache import find_block_forward
from .check import ModelCheck, check_model
from .patch import (
    add_sink_token,
    attention_layers,
    has_sink_token,
    remove_sink_token,
    sink_kv_cache,
)
from .shims import from_pretrained

native.register()
# The recorder and the sampler find a patched model's attention layers, sink cache and block
# forward (logits only where read, Fast-dLLM's block cache) through sinkdlm.protocol, without
# importing sinkdlm.hf.
register_model_hooks(
    attention_layers=lambda model: attention_layers(model) if has_sink_token(model) else None,
    inference_cache=sink_kv_cache,
    block_forward=find_block_forward,
)

__all__ = [
    "ModelCheck",
    "SinkAdapter",
    "add_sink_token",
    "attention_layers",
    "check_model",
    "from_pretrained",
    "has_sink_token",
    "register_adapter",
    "remove_sink_token",
    "sink_kv_cache",
]
