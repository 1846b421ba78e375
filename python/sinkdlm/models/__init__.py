"""Ablation zoo: a small Llama-style masked-diffusion transformer with the sink-paper variants."""

from ..protocol import AttentionCall
from .config import VARIANTS, DiffusionLMConfig, variant_config
from .loss import draw_masks, evaluate_masked_diffusion, smdm_loss, smdm_terms
from .transformer import DiffusionLM, DiffusionLMOutput, load_model, save_model

__all__ = [
    "VARIANTS",
    "AttentionCall",
    "DiffusionLM",
    "DiffusionLMConfig",
    "DiffusionLMOutput",
    "draw_masks",
    "evaluate_masked_diffusion",
    "load_model",
    "save_model",
    "smdm_loss",
    "smdm_terms",
    "variant_config",
]
