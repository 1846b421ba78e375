"""Record per-step attention mass, sink shares and value norms while a model generates.

Recording protocol (sinkdlm.protocol; implemented by sinkdlm.models.DiffusionLM and by Hugging
Face models patched with sinkdlm.hf.add_sink_token; any model can implement it):
  * ``model.attention_layers()`` (or a finder its family registered) returns the attention modules
    in layer order;
  * each has an attribute ``attention_observer`` (None by default); when it is a callable the
    module calls it once per forward with an AttentionCall carrying q (B,H,L,D) and k, v
    (B,Hkv,L,D) after RoPE, lse (B,H,L) over all keys including sinks, scale, key_padding_mask
    (B,L) or None, sink_k / sink_v (S,Hkv,D) or None, and sink_logit (H,) or None.
Each forward call of the model is one recorded step (sinkdlm.generate calls the model once per
diffusion step; with classifier-free guidance the conditional and unconditional calls are
separate steps if the sampler makes two calls). Per step only reductions are kept: O(layers x B x
H x L) numbers, never L x L, with a cap on the number of steps.

A model without the protocol (an unpatched Hugging Face DLM such as LLaDA or Dream) is recorded
through its F.scaled_dot_product_attention calls: the i-th call of a forward is layer i, its output
is left untouched, and the same reductions run on the q, k, v it was given. That covers
bidirectional attention with an optional key-padding mask; anything else raises.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..ops import attention_mass, sink_attention
from ..ops.common import softmax_scale
from ..padding import key_padding_from_sdpa_mask
from ..protocol import AttentionCall, attention_layers


@dataclass
class SinkTrace:
    """What an AttentionRecorder collected; T steps, NL recorded layers, S designated sinks.

    mass (T,NL,B,H,L) float32: attention mass per key; sink_mass (T,NL,B,H,S): mass on each
    designated sink (sink tokens, or the logit sink as S=1); value_norm (T,NL,B,H,L): L2 norm of
    the value vector each head reads at each key; sink_value_norm (T,NL,H,S); input_ids (T,B,L)
    int64 (which tokens were still masked); key_padding_mask (T,B,L) bool; layers: layer indices.
    """

    mass: torch.Tensor
    sink_mass: torch.Tensor
    value_norm: torch.Tensor
    sink_value_norm: torch.Tensor
    input_ids: torch.Tensor
    key_padding_mask: torch.Tensor
    layers: list

    @property
    def num_steps(self) -> int:
        return self.mass.shape[0]

    def to_dict(self, *, method="ratio", epsilon=3.0, k=2.0) -> dict:
        """Dataframe-like dict of equal-length lists, one row per (step, layer, batch, head):
        step, layer, batch, head, top_position, top_mass, top_is_sink, n_sinks, sink_token_share."""
        from .sinks import detect_sinks

        real = self.key_padding_mask[:, None, :, None, :]
        flags = detect_sinks(self.mass, method=method, epsilon=epsilon, k=k, key_padding_mask=real)
        top_mass, top_pos = (self.mass * real).max(-1)
        top_is_sink = flags.gather(-1, top_pos[..., None])[..., 0]
        t, nl, b, h = top_pos.shape
        grid = torch.stack(
            torch.meshgrid(
                torch.arange(t),
                torch.tensor(self.layers),
                torch.arange(b),
                torch.arange(h),
                indexing="ij",
            ),
            -1,
        ).reshape(-1, 4)
        return {
            "step": grid[:, 0].tolist(),
            "layer": grid[:, 1].tolist(),
            "batch": grid[:, 2].tolist(),
            "head": grid[:, 3].tolist(),
            "top_position": top_pos.reshape(-1).tolist(),
            "top_mass": top_mass.reshape(-1).tolist(),
            "top_is_sink": top_is_sink.reshape(-1).tolist(),
            "n_sinks": flags.sum(-1).reshape(-1).tolist(),
            "sink_token_share": self.sink_mass.sum(-1).reshape(-1).tolist(),
        }


class AttentionRecorder:
    """Context manager that records a SinkTrace from a model following the recording protocol.

    >>> with AttentionRecorder(model) as rec:
    ...     sinkdlm.generate(model, prompt, gen_length=64, steps=64, mask_id=mask_id)
    >>> trace = rec.trace()

    layers: indices of the layers to record (default all); max_steps: steps kept (later forwards
    are not recorded, with a warning) so memory stays bounded.
    """

    def __init__(self, model, *, layers=None, max_steps=512):
        self.model = model
        modules = attention_layers(model)
        self._sdpa = modules is None  # no protocol: watch the model's SDPA calls instead
        if self._sdpa:
            self._wanted = None if layers is None else set(layers)
            self.layers = None  # known after the first step: the SDPA calls of one forward
            self._modules = []
        else:
            self.layers = list(range(len(modules))) if layers is None else sorted(layers)
            self._modules = [modules[i] for i in self.layers]
        self.max_steps = max_steps
        self._steps: list[dict] = []
        self._current: dict | None = None  # this step's reductions, keyed by layer index
        self._calls = 0  # SDPA calls seen in this step: the next call's layer index
        self._hook = None
        self._mode = None
        self._warned = False

    def __enter__(self):
        for layer, module in zip(self.layers or [], self._modules, strict=True):
            module.attention_observer = self._observer(layer)
        self._hook = self.model.register_forward_pre_hook(self._start_step, with_kwargs=True)
        if self._sdpa:
            self._mode = _SdpaWatch(self._observe_sdpa)
            self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self._mode = None
        for module in self._modules:
            module.attention_observer = None
        self._hook.remove()
        self._finish_step()
        return False

    def _start_step(self, module, args, kwargs):
        self._finish_step()
        if len(self._steps) >= self.max_steps:
            if not self._warned:
                warnings.warn(
                    f"AttentionRecorder: max_steps={self.max_steps} reached; "
                    "later steps are not recorded",
                    stacklevel=2,
                )
                self._warned = True
            self._current = None
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        # A copy: samplers update the ids in place after each step.
        self._current = {"input_ids": ids.detach().to("cpu", copy=True), "layers": {}}
        self._calls = 0

    def _finish_step(self):
        current, self._current = self._current, None
        if current is None:
            return
        if self.layers is None and current["layers"]:  # SDPA watch: the first step fixes them
            self.layers = sorted(current["layers"])
        if self.layers and all(layer in current["layers"] for layer in self.layers):
            self._steps.append(current)

    def _observe_sdpa(self, call_args, call_kwargs):
        if self._current is None:
            return
        index, self._calls = self._calls, self._calls + 1
        if self._wanted is None or index in self._wanted:
            self._current["layers"][index] = _reduce_call(
                _sdpa_call(index, *call_args, **call_kwargs)
            )

    def _observer(self, layer):
        def observe(call):
            if self._current is not None:
                self._current["layers"][layer] = _reduce_call(call)

        return observe

    def trace(self) -> SinkTrace:
        """Stack the recorded steps into a SinkTrace (tensors on the CPU)."""
        if not self._steps:
            raise RuntimeError("AttentionRecorder recorded no step: run the model inside `with`")
        shapes = {s["input_ids"].shape for s in self._steps}
        if len(shapes) != 1:
            raise RuntimeError(f"recorded steps have different (B,L) shapes {sorted(shapes)}")

        def stack(key):
            return torch.stack(
                [
                    torch.stack([s["layers"][layer][key] for layer in self.layers])
                    for s in self._steps
                ]
            )

        return SinkTrace(
            mass=stack("mass"),
            sink_mass=stack("sink_mass"),
            value_norm=stack("value_norm"),
            sink_value_norm=stack("sink_value_norm"),
            input_ids=torch.stack([s["input_ids"] for s in self._steps]),
            key_padding_mask=torch.stack(
                [s["layers"][self.layers[0]]["real"] for s in self._steps]
            ),
            layers=self.layers,
        )


class _SdpaWatch(TorchFunctionMode):
    """Hands every F.scaled_dot_product_attention call (arguments as given) to ``observe`` after
    running it unchanged. Inside __torch_function__ the mode is off, so the analysis it triggers
    runs plainly."""

    def __init__(self, observe):
        super().__init__()
        self._observe = observe

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            self._observe(args, kwargs)
        return out


def _sdpa_call(
    layer, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_
):
    """An AttentionCall for one SDPA call of a model without the protocol (no sink token)."""
    if is_causal:
        raise ValueError(
            "AttentionRecorder records bidirectional (diffusion) attention; this model called "
            "scaled_dot_product_attention with is_causal=True"
        )
    if query.dim() != 4 or key.shape[-2] != query.shape[-2]:
        raise ValueError(
            "AttentionRecorder needs (B, H, L, D) self-attention from SDPA calls, got query "
            f"{tuple(query.shape)} and key {tuple(key.shape)}"
        )
    kpm = key_padding_from_sdpa_mask(attn_mask, query.shape[0], key.shape[-2], "AttentionRecorder")
    _, lse = sink_attention(query, key, value, key_padding_mask=kpm, scale=scale, return_lse=True)
    scale = softmax_scale(scale, query.shape[-1])
    return AttentionCall(
        layer, query.detach(), key.detach(), value.detach(), lse, scale, kpm, None, None, None
    )


@torch.no_grad()
def _reduce_call(call) -> dict:
    q, k, v, lse = call.q, call.k, call.v, call.lse
    b, h, n, _ = q.shape
    group = h // k.shape[1]
    kpm = call.key_padding_mask
    sink_k, sink_v = call.sink_k, call.sink_v
    first_sink = None if sink_k is None else sink_k[0]
    mass, sink_mass0 = attention_mass(
        q, k, lse, first_sink, sink_logit=call.sink_logit, key_padding_mask=kpm, scale=call.scale
    )
    shares = []
    if sink_k is not None or call.sink_logit is not None:
        shares.append(sink_mass0)
    if sink_k is not None and sink_k.shape[0] > 1:
        # Further sinks: O(L * S) scores against the same lse.
        real = torch.ones(b, n, dtype=torch.bool, device=q.device) if kpm is None else kpm
        count = real.sum(1).clamp_min(1).to(mass.dtype)[:, None]
        for s in range(1, sink_k.shape[0]):
            sk = sink_k[s].repeat_interleave(group, 0).to(mass.dtype)  # (H, D)
            p = torch.exp(
                torch.einsum("bhld,hd->bhl", q.to(mass.dtype), sk) * call.scale - lse.to(mass.dtype)
            )
            shares.append((p * real[:, None, :]).sum(-1) / count)
    value_norm = v.float().norm(dim=-1).repeat_interleave(group, 1)  # (B,H,L)
    if sink_v is not None:
        sink_value_norm = sink_v.float().norm(dim=-1).repeat_interleave(group, 1).T  # (H,S)
    else:
        sink_value_norm = torch.zeros(h, 0)
    real = torch.ones(b, n, dtype=torch.bool) if kpm is None else kpm.to("cpu", copy=True)
    return {
        "mass": mass.float().cpu(),
        "sink_mass": (torch.stack(shares, -1) if shares else mass.new_zeros(b, h, 0)).float().cpu(),
        "value_norm": value_norm.cpu(),
        "sink_value_norm": sink_value_norm.cpu(),
        "real": real,
    }
