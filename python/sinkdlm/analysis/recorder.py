"""Record per-step attention mass, sink shares and value norms while a model generates.

Recording protocol (implemented by sinkdlm.models.DiffusionLM and by Hugging Face models patched
with sinkdlm.hf.add_sink_token; any model can implement it):
  * ``model.attention_layers()`` returns the attention modules in layer order;
  * each has an attribute ``attention_observer`` (None by default); when it is a callable the
    module calls it once per forward with an object carrying q (B,H,L,D) and k, v (B,Hkv,L,D)
    after RoPE, lse (B,H,L) over all keys including sinks, scale, key_padding_mask (B,L) or None,
    sink_k / sink_v (S,Hkv,D) or None, and sink_logit (H,) or None (see models.AttentionCall).
Each forward call of the model is one recorded step (sinkdlm.generate calls the model once per
diffusion step; with classifier-free guidance the conditional and unconditional calls are
separate steps if the sampler makes two calls). Per step only reductions are kept: O(layers x B x
H x L) numbers, never L x L, with a cap on the number of steps.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass

import torch

from .attention_mass import attention_mass


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
        modules = _attention_layers(model)
        self.layers = list(range(len(modules))) if layers is None else sorted(layers)
        self._modules = [modules[i] for i in self.layers]
        self.max_steps = max_steps
        self._steps: list[dict] = []
        self._current: dict | None = None
        self._hook = None
        self._warned = False

    def __enter__(self):
        for pos, module in enumerate(self._modules):
            module.attention_observer = self._observer(pos)
        self._hook = self.model.register_forward_pre_hook(self._start_step, with_kwargs=True)
        return self

    def __exit__(self, *exc):
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

    def _finish_step(self):
        if self._current is not None and len(self._current["layers"]) == len(self._modules):
            self._steps.append(self._current)
        self._current = None

    def _observer(self, pos):
        def observe(call):
            if self._current is not None:
                self._current["layers"][pos] = _reduce_call(call)

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
                    torch.stack([s["layers"][i][key] for i in range(len(self._modules))])
                    for s in self._steps
                ]
            )

        return SinkTrace(
            mass=stack("mass"),
            sink_mass=stack("sink_mass"),
            value_norm=stack("value_norm"),
            sink_value_norm=stack("sink_value_norm"),
            input_ids=torch.stack([s["input_ids"] for s in self._steps]),
            key_padding_mask=torch.stack([s["layers"][0]["real"] for s in self._steps]),
            layers=self.layers,
        )


def _attention_layers(model) -> list:
    if hasattr(model, "attention_layers"):
        return list(model.attention_layers())
    if "transformers" in sys.modules:  # a Hugging Face model patched by sinkdlm.hf?
        from .. import hf

        if hf.has_sink_token(model):
            return hf.attention_layers(model)
    raise TypeError(
        f"{type(model).__name__} does not follow the recording protocol: it needs "
        "attention_layers() returning modules with an attention_observer attribute, or to be a "
        "Hugging Face model patched by sinkdlm.hf.add_sink_token"
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
