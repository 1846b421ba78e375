"""What every backend's patched layer shares: the per-forward sink K/V channel, the sink's own
attention output, the autocast rule, and the autograd links that carry the sink's hidden state
from one decoder layer's call to the next."""

import copy

import torch


class SinkKV:
    """Per-forward channel between the model wrapper, the decoder layers and the attention calls.

    ``kv[layer_key]``: each attention layer's sink K (rotated at the sink position) and V, each
    (Hkv, D). ``collect=True`` while a decoder layer runs the sink's single row: the attention
    stores its K/V there and returns o = V. Otherwise layers read ``kv`` (empty for a model
    without the sink token, patched only for sinkdlm.generate's block cache). ``given``: ``kv``
    was filled before the forward (sink_kv_cache), so the layers run no sink row. ``folded``: the
    running decoder layer was fed the batch with the sink's row appended to every sequence
    (hf/native.py: one pass through the layer's weights for both); its attention takes the sink
    K/V from the last position and returns o = V there.
    ``memo`` holds what every layer of one forward would otherwise recompute (a decoded mask, the
    sink's rotary tables). ``block``: the sampler's :class:`sinkdlm.block_cache.BlockKVCache`
    while the forward runs through it, else None; ``key_padding``: the sampler's (B, T) bool key
    padding over the whole sequence for its cached steps, which feed fewer tokens than there are
    keys (None: none). ``sink_from``/``last_carry``: see :func:`sink_layer_call`.
    """

    def __init__(self, kv=None, collect=False, block=None, key_padding=None, given=False):
        self.kv = {} if kv is None else kv
        self.collect = collect
        self.block = block
        self.key_padding = key_padding
        self.given = given
        self.folded = False
        self.memo = {}
        self.sink_from = {}  # decoder layer index -> the _Carry its sink row read (None: embedding)
        self.last_carry = None

    def fold(self):
        """This channel for a folded layer call: ``folded`` set, everything else shared."""
        folded = copy.copy(self)
        folded.folded = True
        return folded


def expand_sink_output(value, num_heads):
    """The sink attends only to itself, so its attention output is its own V.

    value (1, Hkv, 1, D) -> (1, 1, H, D), kv head j serving query heads j*r .. j*r + r - 1.
    """
    groups = num_heads // value.shape[1]
    return value.repeat_interleave(groups, dim=1).transpose(1, 2).contiguous()


def autocast_inputs(*tensors):
    """Under autocast, SDPA runs in the autocast dtype; sink attention does the same (rotary
    embeddings otherwise leave q/k in float32 next to a bfloat16 v)."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) for t in tensors)


# ----- The sink's hidden state between decoder layer calls.
#
# Each decoder layer's call runs the sink's row (1, 1, d) first, then the batch. The sink's output
# feeds the next layer's sink row, but it must not leave the call beside its output: sharded data
# parallel wrappers (FSDP2, FSDP1) gather a layer's parameters for backward from a hook on the
# call's outputs and free them once the gradients of the call's inputs are done. So the sink's
# output is attached to the batch output (``_CarryToNext``: the batch output unchanged, its backward
# releasing the sink's gradient), and the next call takes its sink row from its own batch input
# (``_SinkFromPrevious``, ``_SinkFromEmbedding``: the input's backward waits for them). The sink's
# backward through a layer therefore starts after that layer's output hook and ends before its
# input's gradient is complete: inside the window in which the layer's parameters are gathered.


class _Carry:
    """One layer's sink output (detached) going forward, and its gradient coming back."""

    __slots__ = ("value", "grad")

    def __init__(self):
        self.value = None
        self.grad = None


class _CarryToNext(torch.autograd.Function):
    """(batch_out, sink_out) -> batch_out; backward also hands sink_out the gradient that the next
    layer's sink row left in ``carry``."""

    @staticmethod
    def forward(ctx, batch_out, sink_out, carry):
        carry.value = sink_out.detach()
        ctx.carry = carry
        # A copy, not a view: FSDP2 warns on view outputs, and autograd forbids in-place updates
        # of a custom Function's views. The input is freed at once (a residual sum nobody saves).
        return batch_out.clone()

    @staticmethod
    def backward(ctx, grad_out):
        grad_sink, ctx.carry.grad = ctx.carry.grad, None
        return grad_out, grad_sink, None


class _SinkFromPrevious(torch.autograd.Function):
    """(batch_in, carry) -> the previous layer's sink output; its gradient goes into ``carry``."""

    @staticmethod
    def forward(ctx, batch_in, carry):
        ctx.carry = carry
        return carry.value.clone()

    @staticmethod
    def backward(ctx, grad_sink):
        carry = ctx.carry
        carry.grad = grad_sink if carry.grad is None else carry.grad + grad_sink
        return None, None


class _SinkFromEmbedding(torch.autograd.Function):
    """(batch_in, sink embedding (1, 1, d)) -> the embedding, the gradient passed straight on."""

    @staticmethod
    def forward(ctx, batch_in, embeds):
        return embeds.clone()

    @staticmethod
    def backward(ctx, grad_sink):
        return None, grad_sink


def sink_layer_call(channel, index, batch_in, embed_sink, run_layer):
    """One decoder layer's call with the sink: the sink's row and the batch; returns the batch
    output (tensor, or the layer's tuple with the hidden state first) carrying the sink's output.

    ``index``: the layer's place in the model (0, 1, ...); ``batch_in`` (B, L, d): the call's
    hidden-state input; ``embed_sink()`` -> (1, 1, d): the sink's input to the first layer;
    ``run_layer(sink_in (1, 1, d))`` -> (the layer's own output, the sink's output (1, 1, d)):
    the sink's row and the batch through the layer, the batch's attention reading the sink K/V.

    The first layer called in a forward takes the sink embedding, each later one the sink output
    of the layer called before it; a call replayed by activation checkpointing reads what the
    first call read. Without gradients or under torch.compile the sink's output is passed on as is
    (no backward to order; plain data flow for the graph).
    """
    direct = torch.compiler.is_compiling() or not torch.is_grad_enabled()
    if index not in channel.sink_from:
        channel.sink_from[index] = channel.last_carry
    source = channel.sink_from[index]
    if source is None:
        sink_in = embed_sink()
        if not direct:
            sink_in = _SinkFromEmbedding.apply(batch_in, sink_in)
    else:
        sink_in = source.value if direct else _SinkFromPrevious.apply(batch_in, source)
    out, sink_out = run_layer(sink_in)
    carry = _Carry()
    channel.last_carry = carry
    hidden = out[0] if isinstance(out, tuple) else out
    if direct:
        carry.value = sink_out
    else:
        hidden = _CarryToNext.apply(hidden, sink_out, carry)
    return (hidden, *out[1:]) if isinstance(out, tuple) else hidden
