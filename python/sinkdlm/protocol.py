"""How generic code (the recorder, the sampler) works with any model family without importing it.

Recording protocol (sinkdlm.analysis.AttentionRecorder). A model names its attention modules in
layer order: ``model.attention_layers()``, or a finder its family registered with
:func:`register_model_hooks` (sinkdlm.hf does for patched Hugging Face models). Each module has an
attribute ``attention_observer``, None by default; while it is a callable, the module hands it
one :class:`AttentionCall` per forward. Attention computed by :func:`observed_sink_attention`
does that by itself; attention computed another way reports with :func:`report_attention`.

Inference cache (sinkdlm.generate). :func:`inference_cache` enters the cache context every family
registered (sinkdlm.hf: ``sink_kv_cache``, so a sampler's forwards run the sink pass once); each is
a no-op on models it does not know.

Block forward (sinkdlm.generate). :func:`block_forward` gives the sampler a forward that computes
logits only where a step reads them and runs through Fast-dLLM's block KV cache
(sinkdlm.block_cache) for the families that support it.

This module imports only the operators: sinkdlm.models, sinkdlm.hf and sinkdlm.analysis build on
it, not the other way round.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .ops import sink_attention
from .ops.common import softmax_scale

__all__ = [
    "AttentionCall",
    "attention_layers",
    "block_forward",
    "inference_cache",
    "observed_sink_attention",
    "register_model_hooks",
    "report_attention",
]


@dataclass
class AttentionCall:
    """What one attention layer saw in one forward, handed to an attention observer.

    q (B,H,L,D) and k, v (B,Hkv,L,D) after RoPE; lse (B,H,L) the log-sum-exp of each query row over
    every key including the sinks; key_padding_mask bool (B,L) or None; sink_k, sink_v (S,Hkv,D)
    for S sink tokens (after RoPE) or None; sink_logit (H,) or None; scale the softmax scale.
    """

    layer: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    lse: torch.Tensor
    scale: float
    key_padding_mask: torch.Tensor | None
    sink_k: torch.Tensor | None
    sink_v: torch.Tensor | None
    sink_logit: torch.Tensor | None


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def report_attention(
    observer: Callable[[AttentionCall], None],
    layer: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    key_padding_mask: torch.Tensor | None = None,
    sink_k: torch.Tensor | None = None,
    sink_v: torch.Tensor | None = None,
    sink_logit: torch.Tensor | None = None,
) -> None:
    """Hands ``observer`` the :class:`AttentionCall` of one layer (tensors detached; shapes as
    there, sink_k / sink_v with the leading S dimension)."""
    observer(
        AttentionCall(
            layer,
            q.detach(),
            k.detach(),
            v.detach(),
            lse.detach(),
            scale,
            key_padding_mask,
            _detached(sink_k),
            _detached(sink_v),
            _detached(sink_logit),
        )
    )


def observed_sink_attention(
    module: torch.nn.Module,
    layer: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink_k: torch.Tensor | None = None,
    sink_v: torch.Tensor | None = None,
    *,
    sink_logit: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    query_padding_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """:func:`sinkdlm.sink_attention` (same arguments and output; one sink K/V of (Hkv, D)) that
    also reports to ``module.attention_observer`` when one is set (then the op returns the lse
    too, which the observer needs). An observer of packed rows (``segment_ids``) is refused:
    the attention mass takes no segments."""
    observer = getattr(module, "attention_observer", None)
    kwargs = dict(
        sink_logit=sink_logit,
        key_padding_mask=key_padding_mask,
        query_padding_mask=query_padding_mask,
        segment_ids=segment_ids,
        scale=scale,
    )
    if observer is None:
        return sink_attention(q, k, v, sink_k, sink_v, **kwargs)
    if segment_ids is not None:
        raise NotImplementedError(
            "recording attention (AttentionRecorder) over packed rows is not supported: the "
            "attention mass takes no segment ids; record unpacked batches"
        )
    out, lse = sink_attention(q, k, v, sink_k, sink_v, return_lse=True, **kwargs)
    report_attention(
        observer,
        layer,
        q,
        k,
        v,
        lse,
        softmax_scale(scale, q.shape[-1]),
        key_padding_mask,
        None if sink_k is None else sink_k[None],
        None if sink_v is None else sink_v[None],
        sink_logit,
    )
    return out


_LAYER_FINDERS: list[Callable[[torch.nn.Module], list | None]] = []
_INFERENCE_CACHES: list[Callable[[torch.nn.Module], contextlib.AbstractContextManager]] = []
_BLOCK_FORWARDS: list[Callable[[torch.nn.Module], Callable | None]] = []


def register_model_hooks(*, attention_layers=None, inference_cache=None, block_forward=None):
    """Lets a model family take part in the protocols without generic code importing it.

    Args:
        attention_layers: ``(model) -> list of attention modules in layer order``, or None for a
            model that is not the family's.
        inference_cache: ``(model) -> context manager`` entered around a sampler's forwards; it
            must do nothing on a model that is not the family's.
        block_forward: ``(model) -> the model's block forward`` (see :func:`block_forward`), or
            None for a model that is not the family's.
    """
    if attention_layers is not None:
        _LAYER_FINDERS.append(attention_layers)
    if inference_cache is not None:
        _INFERENCE_CACHES.append(inference_cache)
    if block_forward is not None:
        _BLOCK_FORWARDS.append(block_forward)


def attention_layers(model: torch.nn.Module) -> list | None:
    """The attention modules of a model following the recording protocol, in layer order, or
    None for a model without it."""
    if hasattr(model, "attention_layers"):
        return list(model.attention_layers())
    for find in _LAYER_FINDERS:
        layers = find(model)
        if layers is not None:
            return list(layers)
    return None


@contextlib.contextmanager
def inference_cache(model: torch.nn.Module):
    """Every registered inference cache entered for ``model`` (a no-op when none applies)."""
    with contextlib.ExitStack() as stack:
        for cache in _INFERENCE_CACHES:
            stack.enter_context(cache(model))
        yield model


def _model_logits(model, tokens, attention_mask):
    out = model(tokens) if attention_mask is None else model(tokens, attention_mask=attention_mask)
    return out.logits if hasattr(out, "logits") else out


def block_forward(model) -> tuple[Callable, bool]:
    """The sampler's forward of ``model``, and whether it supports the block cache.

    A block forward is ``(tokens, attention_mask, *, cache, keep) -> logits``: ``tokens`` (B, Lq)
    int64 at sequence positions ``cache.query_start ..`` (all T positions when ``cache`` is None
    or refreshing; see :class:`sinkdlm.block_cache.BlockKVCache`); ``attention_mask`` None or
    (B, T) over the whole sequence, 1 = real; ``keep`` (K,) int64 positions within ``tokens``
    whose logits the step reads: the LM head runs on those hidden states only, and the result is
    (B, K, V). It is the model's ``block_forward`` method (:class:`sinkdlm.models.DiffusionLM`),
    else the first registered family's (sinkdlm.hf for Hugging Face models), else, for any
    callable ``model(tokens[, attention_mask=...])`` returning logits, its full logits with the
    kept positions taken from them (no cache).
    """
    method = getattr(model, "block_forward", None)
    if callable(method):
        return method, True
    for find in _BLOCK_FORWARDS:
        forward = find(model)
        if forward is not None:
            return forward, True

    def uncached(tokens, attention_mask, *, cache, keep):
        return _model_logits(model, tokens, attention_mask)[:, keep]

    return uncached, False
