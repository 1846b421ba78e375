"""Instruments for attention sinks in diffusion LMs: attention mass per key (the operator in
sinkdlm.ops), sink detection, moving-sink statistics, a recorder for generation, and plots."""

from ..ops import attention_mass, attention_mass_reference
from .plots import plot_comparison, plot_sink_heatmap, plot_value_norms, sink_frequency
from .recorder import AttentionRecorder, SinkTrace
from .sinks import METHODS, detect_sinks, moving_sink_stats

__all__ = [
    "METHODS",
    "AttentionRecorder",
    "SinkTrace",
    "attention_mass",
    "attention_mass_reference",
    "detect_sinks",
    "moving_sink_stats",
    "plot_comparison",
    "plot_sink_heatmap",
    "plot_value_norms",
    "sink_frequency",
]
