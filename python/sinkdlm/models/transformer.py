"""The ablation-zoo transformer: a small Llama-style bidirectional masked-diffusion LM.

Sink tokens are not part of the input sequence. Because a sink attends only to itself, its hidden
state in every layer is independent of the input: the model runs the sink embeddings through the
layers on their own (each sink's attention output is its own value vector) and hands their per-layer
K/V to the text tokens' attention as separate small tensors. With one sink this is exactly
``sinkdlm.sink_attention``; 2 or 4 sinks use PyTorch SDPA over [sinks ; tokens] with a key mask,
since the native operator carries one sink K/V per head. Each of several sinks also sees only itself
(the paper's rule applied to each), so they differ only by their embedding and RoPE position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import sink_attention
from ..ops.common import softmax_scale
from ..protocol import observed_sink_attention, report_attention
from .config import DiffusionLMConfig


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    """cos, sin (P, head_dim) float32 for integer positions (P,) (negative positions allowed)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device) / head_dim)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., P, D) by the angles of P positions (cos/sin (P, D)); rotate-half form."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos.to(x.dtype) + rotated * sin.to(x.dtype)).to(x.dtype)


@dataclass
class DiffusionLMOutput:
    """Model output: logits (B,L,V). Shaped like a Hugging Face output so that
    sinkdlm.train.masked_diffusion_loss and sinkdlm.generate accept the model as is."""

    logits: torch.Tensor


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """GQA attention with the configured sink variant.

    ``attention_observer``: None, or a callable receiving an AttentionCall after every forward
    (the recording protocol, sinkdlm.protocol).
    """

    def __init__(self, cfg: DiffusionLMConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        h, hkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, h * hd, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, hkv * hd, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, hkv * hd, bias=False)
        self.o_proj = nn.Linear(h * hd, cfg.d_model, bias=False)
        self.sink_logit = nn.Parameter(torch.zeros(h)) if cfg.sink == "logit" else None
        self.gate = nn.Linear(cfg.d_model, h * hd) if cfg.sink == "gate" else None
        self.attention_observer = None

    def _sink_kv(self, sink_x, sink_cos, sink_sin):
        cfg = self.cfg
        s = sink_x.shape[0]
        sk = self.k_proj(sink_x).view(s, cfg.n_kv_heads, cfg.head_dim).transpose(0, 1)
        sk = apply_rope(sk, sink_cos, sink_sin).transpose(0, 1)  # (S, Hkv, D)
        sv = self.v_proj(sink_x).view(s, cfg.n_kv_heads, cfg.head_dim)
        if cfg.sink_zero_value:
            sv = torch.zeros_like(sv)
        return sk, sv

    def forward(
        self, x, cos, sin, key_padding_mask=None, sink_x=None, sink_cos=None, sink_sin=None
    ):
        """x (B,L,d) normed input -> (attention output (B,L,d), sink output (S,d) or None)."""
        cfg = self.cfg
        b, n, _ = x.shape
        h, hkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q = apply_rope(self.q_proj(x).view(b, n, h, hd).transpose(1, 2), cos, sin)
        k = apply_rope(self.k_proj(x).view(b, n, hkv, hd).transpose(1, 2), cos, sin)
        v = self.v_proj(x).view(b, n, hkv, hd).transpose(1, 2)
        scale = softmax_scale(None, hd)
        sink_k = sink_v = sink_out = None
        if sink_x is not None:
            sink_k, sink_v = self._sink_kv(sink_x, sink_cos, sink_sin)
            # A sink sees only itself: its attention output is its own value, copied to each head.
            own = sink_v.repeat_interleave(h // hkv, dim=1).reshape(sink_x.shape[0], h * hd)
            sink_out = self.o_proj(own)
        if sink_k is not None and sink_k.shape[0] > 1:
            out = self._multi_sink_attention(q, k, v, sink_k, sink_v, key_padding_mask, scale)
            if self.attention_observer is not None:
                lse = self._multi_sink_lse(q, k, v, sink_k, sink_v, key_padding_mask, scale)
                report_attention(
                    self.attention_observer,
                    self.layer,
                    q,
                    k,
                    v,
                    lse,
                    scale,
                    key_padding_mask,
                    sink_k,
                    sink_v,
                    self.sink_logit,
                )
        else:
            out = observed_sink_attention(
                self,
                self.layer,
                q,
                k,
                v,
                None if sink_k is None else sink_k[0],
                None if sink_v is None else sink_v[0],
                sink_logit=self.sink_logit,
                key_padding_mask=key_padding_mask,
                scale=scale,
            )
        out = out.transpose(1, 2).reshape(b, n, h * hd)
        if self.gate is not None:
            out = out * torch.sigmoid(self.gate(x))
        return self.o_proj(out), sink_out

    @staticmethod
    def _multi_sink_attention(q, k, v, sink_k, sink_v, key_padding_mask, scale):
        b, _, n, _ = q.shape
        s = sink_k.shape[0]
        k_all = torch.cat([sink_k.permute(1, 0, 2).expand(b, -1, -1, -1), k], dim=2)
        v_all = torch.cat([sink_v.permute(1, 0, 2).expand(b, -1, -1, -1), v], dim=2)
        mask = None
        if key_padding_mask is not None:
            sinks_visible = key_padding_mask.new_ones(b, s)
            mask = torch.cat([sinks_visible, key_padding_mask], dim=1)[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q, k_all, v_all, attn_mask=mask, scale=scale, enable_gqa=True
        )
        if key_padding_mask is not None:  # padded query rows return 0, as sink_attention does
            out = out * key_padding_mask[:, None, :, None].to(out.dtype)
        return out

    @staticmethod
    @torch.no_grad()
    def _multi_sink_lse(q, k, v, sink_k, sink_v, key_padding_mask, scale):
        # lse over [sink_0 ; tokens] from the op, then log-add the other sinks' scores: O(L * S).
        _, lse0 = sink_attention(
            q,
            k,
            v,
            sink_k[0],
            sink_v[0],
            key_padding_mask=key_padding_mask,
            scale=scale,
            return_lse=True,
        )
        group = q.shape[1] // k.shape[1]
        extra = sink_k[1:].repeat_interleave(group, dim=1).to(q.dtype)  # (S-1, H, D)
        scores = torch.einsum("bhld,shd->bhls", q, extra).float() * scale
        lse = torch.logsumexp(torch.cat([lse0.float()[..., None], scores], dim=-1), dim=-1)
        if key_padding_mask is not None:
            lse = lse * key_padding_mask[:, None, :]
        return lse.to(lse0.dtype)


class Block(nn.Module):
    def __init__(self, cfg: DiffusionLMConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.ffn_dim)

    def forward(self, x, cos, sin, key_padding_mask, sink_h, sink_cos, sink_sin):
        sink_x = None if sink_h is None else self.attn_norm(sink_h)
        a, sink_a = self.attn(
            self.attn_norm(x), cos, sin, key_padding_mask, sink_x, sink_cos, sink_sin
        )
        x = x + a
        x = x + self.mlp(self.mlp_norm(x))
        if sink_h is not None:
            sink_h = sink_h + sink_a
            sink_h = sink_h + self.mlp(self.mlp_norm(sink_h))
        return x, sink_h


class DiffusionLM(nn.Module):
    """Bidirectional masked-diffusion LM: ``forward(input_ids, attention_mask=None)``.

    input_ids int64 (B,L); attention_mask bool/int (B,L), 1 = real token. Returns a
    DiffusionLMOutput whose ``logits`` are (B,L,vocab_size) in the parameters' dtype. Sink tokens
    (if configured) are internal: never in the input, never masked, never in the loss.
    """

    def __init__(self, cfg: DiffusionLMConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        s = cfg.sink_token_count
        self.sink_embedding = nn.Parameter(torch.empty(s, cfg.d_model)) if s else None
        self.reset_parameters()

    def reset_parameters(self):
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith("sink_logit") or name.endswith("gate.bias"):
                nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, std=std)

    def attention_layers(self) -> list[Attention]:
        """The attention modules, in layer order (recording protocol, see sinkdlm.analysis)."""
        return [blk.attn for blk in self.layers]

    def sink_positions(self, seq_len: int) -> list[int]:
        """RoPE positions of the sink tokens for a text of seq_len tokens at positions 0..L-1."""
        s = self.config.sink_token_count
        if self.config.sink_position == "front":
            return list(range(-s, 0))
        return list(range(seq_len, seq_len + s))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        b, n = input_ids.shape
        cfg = self.config
        device = input_ids.device
        x = self.embed(input_ids)
        cos, sin = rope_cos_sin(torch.arange(n, device=device), cfg.head_dim, cfg.rope_theta)
        kpm = None if attention_mask is None else attention_mask.to(torch.bool)
        sink_h = sink_cos = sink_sin = None
        if self.sink_embedding is not None:
            sink_h = self.sink_embedding.to(x.dtype)
            pos = torch.tensor(self.sink_positions(n), device=device)
            sink_cos, sink_sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta)
        for blk in self.layers:
            x, sink_h = blk(x, cos, sin, kpm, sink_h, sink_cos, sink_sin)
        return DiffusionLMOutput(self.lm_head(self.norm(x)))


def save_model(model: DiffusionLM, path) -> None:
    """Write the weights and config to one safetensors file (config JSON in its metadata)."""
    import json

    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"sinkdlm_config": json.dumps(model.config.to_dict())})


def load_model(path, device="cpu") -> DiffusionLM:
    """Inverse of save_model: rebuild the DiffusionLM from a safetensors file."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    if not meta or "sinkdlm_config" not in meta:
        raise ValueError(f"{path} has no sinkdlm_config metadata: not written by save_model")
    model = DiffusionLM(DiffusionLMConfig(**json.loads(meta["sinkdlm_config"])))
    model.load_state_dict(load_file(str(path), device=str(device)))
    return model.to(device)
