"""check_model: is add_sink_token exact on this model? One call compares the patched model with the
paper's literal form (a real sink token in front, a dense sink mask in every attention)."""

import copy
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..ops.reference import sink_attention_mask
from .checkpoint import SINK_MODULE
from .patch import _host, _unwrap, add_sink_token, has_sink_token, remove_sink_token


@dataclass(frozen=True)
class ModelCheck:
    """What :func:`check_model` measured: the largest |patched - literal| logit over real tokens,
    the largest |logit| (for scale) and the number of SDPA calls the literal form masked."""

    max_abs_diff: float
    max_abs_logit: float
    sdpa_calls: int


class _LiteralSinkMask(TorchFunctionMode):
    """Every F.scaled_dot_product_attention over the L + 1 tokens gets the dense sink mask (and
    is_causal=False) in place of whatever mask the model built."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is F.scaled_dot_product_attention:
            query = args[0] if args else kwargs["query"]
            if query.shape[-2] == self.mask.shape[-1]:
                args = args[:3]
                kwargs.pop("attn_mask", None)
                kwargs["is_causal"] = False
                kwargs["attn_mask"] = self.mask.to(query.device)
                self.calls += 1
        return func(*args, **kwargs)


def _logits(output):
    return output.logits if hasattr(output, "logits") else output[0]


def check_model(model, *, batch=2, length=9, padding=True, seed=0, **forward_kwargs):
    """Measures how far sinkdlm's sink token is from the paper's literal form on ``model``.

    A copy of ``model`` gets ``add_sink_token`` (a patched model is copied as is) with a random
    sink embedding; another copy, unpatched, runs ``[sink ; tokens]`` with the dense sink mask put
    into each of its ``F.scaled_dot_product_attention`` calls. Both see the same random batch
    ``(batch, length)``, its last row padded over the last third when ``padding``; the patched one
    gets ``attention_mask`` (B, L) (1 = real), the literal one no mask (the sink mask carries the
    padding). ``model`` itself is not changed.

    Args:
        model: a transformers model sinkdlm can patch (its attention must call SDPA for the
            literal form: e.g. ``attn_implementation="sdpa"``), unpatched or patched with the
            default ``sink_position=-1``.
        forward_kwargs: passed to both forwards (``use_cache=False`` is added when the forward
            takes ``use_cache``).

    Returns:
        :class:`ModelCheck`; when sinkdlm is exact on the model, ``max_abs_diff`` is rounding:
        about 1e-6 of ``max_abs_logit`` in float32, and not much less in float64 (most models
        compute their rotary tables in float32).

    Raises:
        ValueError: the literal form made no SDPA call (eager attention), or the model's sink
        sits elsewhere than sink_position=-1.
    """
    inner = _unwrap(model)
    if has_sink_token(inner):
        recorded = inner.config.sinkdlm["sink_position"]
        if recorded != -1:
            raise ValueError(f"check_model needs sink_position=-1, this model has {recorded}")
        patched = copy.deepcopy(inner).eval()
        literal = remove_sink_token(copy.deepcopy(inner)).eval()
    else:
        literal = copy.deepcopy(inner).eval()
        patched = add_sink_token(copy.deepcopy(inner)).eval()
        gen = torch.Generator().manual_seed(seed)
        table = patched.get_input_embeddings().weight
        sink_weight = getattr(_host(patched), SINK_MODULE).weight
        with torch.no_grad():
            noise = torch.randn(sink_weight.shape, generator=gen, dtype=torch.float32)
            sink_weight.copy_(noise * table.detach().float().std())
    sink = getattr(_host(patched), SINK_MODULE).weight.detach()
    if "use_cache" in inspect.signature(inner.forward).parameters:
        forward_kwargs.setdefault("use_cache", False)

    table = literal.get_input_embeddings()
    device = table.weight.device
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, table.weight.shape[0], (batch, length), generator=gen).to(device)
    real = torch.ones(batch, length, dtype=torch.bool, device=device)
    if padding:
        real[-1, length - max(1, length // 3) :] = False
    mask = sink_attention_mask(length, 0, key_padding_mask=real)[:, None]
    with torch.no_grad():
        got = _logits(patched(input_ids=ids, attention_mask=real.long(), **forward_kwargs))
        embeds = table(ids)
        inputs = torch.cat([sink.to(embeds.dtype).expand(batch, 1, -1), embeds], 1)
        with _LiteralSinkMask(mask) as literal_mask:
            want = _logits(literal(inputs_embeds=inputs, **forward_kwargs))[:, 1:]
    if literal_mask.calls == 0:
        raise ValueError(
            f"check_model: {type(inner).__name__} made no F.scaled_dot_product_attention call over "
            "the sequence, so the literal form cannot be built (load it with "
            "attn_implementation='sdpa')"
        )
    diff = (got.double() - want.double())[real].abs().max().item()
    return ModelCheck(
        max_abs_diff=diff,
        max_abs_logit=want.double()[real].abs().max().item(),
        sdpa_calls=literal_mask.calls,
    )
