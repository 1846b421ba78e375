"""Configuration of the ablation-zoo transformer and the named variants of the sink paper."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

SINK_KINDS = ("none", "tokens", "logit", "gate")


@dataclass
class DiffusionLMConfig:
    """Llama-style bidirectional masked-diffusion transformer (RMSNorm, RoPE, SwiGLU, GQA).

    sink selects the attention variant:
      "none"    plain bidirectional attention (the baseline);
      "tokens"  ``num_sink_tokens`` learned sink tokens that attend only to themselves, placed in
                RoPE position before the text ("front": positions -n..-1) or after it ("end":
                positions L..L+n-1); ``sink_zero_value`` forces their value vectors to 0;
      "logit"   a learned per-layer, per-head sink logit with no value (gpt-oss form);
      "gate"    gated attention: output * sigmoid(Linear(d, d)(normed input)) before o_proj.
    """

    vocab_size: int
    mask_id: int
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_hidden: int | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    sink: str = "none"
    num_sink_tokens: int = 1
    sink_position: str = "front"
    sink_zero_value: bool = False
    init_std: float = 0.02

    def __post_init__(self):
        if self.sink not in SINK_KINDS:
            raise ValueError(f"sink must be one of {SINK_KINDS}, got {self.sink!r}")
        if self.sink_position not in ("front", "end"):
            raise ValueError(f"sink_position must be 'front' or 'end', got {self.sink_position!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads {self.n_heads} not divisible by n_kv_heads {self.n_kv_heads}"
            )
        if self.sink == "tokens" and self.num_sink_tokens < 1:
            raise ValueError(f"num_sink_tokens must be >= 1, got {self.num_sink_tokens}")
        if (self.head_dim // 2) * 2 != self.head_dim:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return 32 * ((8 * self.d_model // 3 + 31) // 32)  # Llama's 8/3 d, rounded up to 32

    @property
    def sink_token_count(self) -> int:
        """Number of sink tokens the model carries (0 unless sink == "tokens")."""
        return self.num_sink_tokens if self.sink == "tokens" else 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The paper's variants and the open questions of issue 7, as overrides of DiffusionLMConfig.
VARIANTS: dict[str, dict] = {
    "baseline": {"sink": "none"},
    "sink1": {"sink": "tokens", "num_sink_tokens": 1, "sink_position": "front"},
    "sink1_end": {"sink": "tokens", "num_sink_tokens": 1, "sink_position": "end"},
    "sink2": {"sink": "tokens", "num_sink_tokens": 2},
    "sink4": {"sink": "tokens", "num_sink_tokens": 4},
    "sink1_zero_value": {"sink": "tokens", "num_sink_tokens": 1, "sink_zero_value": True},
    "sink_logit": {"sink": "logit"},
    "gate": {"sink": "gate"},
}


def variant_config(name: str, **kwargs) -> DiffusionLMConfig:
    """DiffusionLMConfig for a named variant (see VARIANTS); kwargs set the size and vocabulary."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {sorted(VARIANTS)}")
    return DiffusionLMConfig(**{**kwargs, **VARIANTS[name]})
