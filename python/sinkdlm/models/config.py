"""Configuration of the ablation-zoo transformer and the named variants of the sink paper."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

SINK_KINDS = ("none", "tokens", "logit", "gate")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_float(name: str, value, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be finite and {'> 0' if positive else '>= 0'}, got {value}")


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
        for name, minimum in (
            ("vocab_size", 1),
            ("d_model", 1),
            ("n_layers", 1),
            ("n_heads", 1),
            ("n_kv_heads", 1),
            ("num_sink_tokens", 1),
        ):
            _check_int(name, getattr(self, name), minimum)
        if self.ffn_hidden is not None:
            _check_int("ffn_hidden", self.ffn_hidden, 1)
        _check_int("mask_id", self.mask_id, 0)
        if self.mask_id >= self.vocab_size:
            raise ValueError(
                f"mask_id must be a token id in [0, vocab_size = {self.vocab_size}), "
                f"got {self.mask_id}"
            )
        for name in ("rope_theta", "norm_eps"):
            _check_float(name, getattr(self, name), positive=True)
        _check_float("init_std", self.init_std, positive=False)
        if self.sink not in SINK_KINDS:
            raise ValueError(f"sink must be one of {SINK_KINDS}, got {self.sink!r}")
        if self.sink_position not in ("front", "end"):
            raise ValueError(f"sink_position must be 'front' or 'end', got {self.sink_position!r}")
        if not isinstance(self.sink_zero_value, bool):
            raise TypeError(f"sink_zero_value must be a bool, got {self.sink_zero_value!r}")
        if self.sink != "tokens":
            # Settings of sink tokens on a model without them would be ignored: refuse them.
            for name, default in _TOKEN_SETTINGS.items():
                if getattr(self, name) != default:
                    raise ValueError(
                        f"{name}={getattr(self, name)!r} applies to sink='tokens' only; "
                        f"this config has sink={self.sink!r}"
                    )
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads {self.n_heads} not divisible by n_kv_heads {self.n_kv_heads}"
            )
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


# The fields that only sink tokens use, with their defaults (kept when sink != "tokens").
_TOKEN_SETTINGS = {"num_sink_tokens": 1, "sink_position": "front", "sink_zero_value": False}


def variant_config(name: str, **kwargs) -> DiffusionLMConfig:
    """DiffusionLMConfig for a named variant (see VARIANTS); kwargs set the size and vocabulary.

    A keyword that the variant fixes may be passed only with the variant's own value: anything
    else raises ValueError rather than being overridden (an ablation must run as asked).
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {sorted(VARIANTS)}")
    variant = VARIANTS[name]
    for key, value in kwargs.items():
        if key in variant and variant[key] != value:
            raise ValueError(
                f"variant {name!r} sets {key}={variant[key]!r}, got {key}={value!r}: pass "
                "only the size and vocabulary (another variant, or DiffusionLMConfig itself, "
                f"for {key}={value!r})"
            )
    return DiffusionLMConfig(**{**kwargs, **variant})
