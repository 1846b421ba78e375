"""Sink detection and moving-sink statistics over a diffusion trajectory.

Criteria from the literature, selectable by ``method``:
  "ratio":  key j is a sink if Ā_j > epsilon * (mean of Ā over the other real keys); the analysis
            paper (arXiv 2510.15731) calls epsilon = 3 a balanced threshold;
  "zscore": key j is a sink if Ā_j > mean + k * std of Ā over the real keys (k = 2).
"""

from __future__ import annotations

import math

import torch

from .. import _checks
from .recorder import SinkTrace

METHODS = ("ratio", "zscore")


def detect_sinks(mass, *, method="ratio", epsilon=3.0, k=2.0, key_padding_mask=None):
    """Boolean sink flags for attention mass ``mass`` (..., L) (per step/layer/head, any leading
    dims). key_padding_mask: optional bool broadcastable to mass, True = real key; padded keys are
    never sinks and do not enter the statistics. Returns bool (..., L)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(mass, torch.Tensor) or not mass.is_floating_point() or mass.dim() < 1:
        _checks.fail(
            "detect_sinks", "mass", "a floating (..., L) tensor", _checks.describe(mass), TypeError
        )
    _checks.real("detect_sinks", "epsilon", epsilon)
    _checks.real("detect_sinks", "k", k)
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            _checks.fail(
                "detect_sinks",
                "key_padding_mask",
                "a bool tensor",
                _checks.describe(key_padding_mask),
                TypeError,
            )
        try:
            fits = torch.broadcast_shapes(key_padding_mask.shape, mass.shape) == mass.shape
        except RuntimeError:
            fits = False
        if not fits:
            _checks.fail(
                "detect_sinks",
                "key_padding_mask",
                f"broadcastable to mass's shape {tuple(mass.shape)}",
                f"shape {tuple(key_padding_mask.shape)}",
            )
    mass = mass.double()
    real = (
        torch.ones_like(mass, dtype=torch.bool)
        if key_padding_mask is None
        else key_padding_mask.to(torch.bool).expand_as(mass)
    )
    m = mass * real
    count = real.sum(-1, keepdim=True).double()
    total = m.sum(-1, keepdim=True)
    if method == "ratio":
        others = (total - m) / (count - 1).clamp_min(1)
        flags = m > epsilon * others
        flags &= count > 1
    else:
        mean = total / count.clamp_min(1)
        var = (((m - mean) * real) ** 2).sum(-1, keepdim=True) / count.clamp_min(1)
        flags = m > mean + k * var.sqrt()
    return flags & real


def _stack_pair_stats(position, valid):
    # position, valid: (T, N) dominant-sink position per step for N (layer, batch, head) series.
    both = valid[1:] & valid[:-1]
    moved = (position[1:] != position[:-1]) & both
    pairs = int(both.sum())
    move_rate = float(moved.sum()) / pairs if pairs else math.nan
    spreads, distinct = [], []
    for s in range(position.shape[1]):
        pos = position[valid[:, s], s].double()
        if pos.numel() >= 2:
            spreads.append(float(pos.std(unbiased=False)))
        if pos.numel() >= 1:
            distinct.append(len(torch.unique(pos)))
    return move_rate, spreads, distinct


def moving_sink_stats(trace, *, method="ratio", epsilon=3.0, k=2.0):
    """Moving-sink statistics of a SinkTrace (see sinkdlm.analysis.recorder).

    The dominant sink of a (step, layer, sequence, head) is its highest-mass key, counted only if
    the criterion flags it. Returns a dict of Python floats / lists:
      sink_rate            share of (step, layer, seq, head) with at least one token sink
      sinks_per_head       mean number of flagged keys per (step, layer, seq, head)
      move_rate            share of consecutive-step pairs (both with a sink) whose dominant sink
                           moved to another position
      move_rate_per_layer  the same per recorded layer
      position_spread      mean over (layer, seq, head) of the std of the dominant sink position
      distinct_positions   mean number of distinct dominant-sink positions per (layer, seq, head)
      top_key_mass         mean mass of the highest-mass token key
      sink_token_share     mean attention share of the designated sink(s) (nan if the model has
                           none); sink_token_share_per_layer likewise
      value_norm_sink / value_norm_other   mean value-vector L2 norm of flagged keys vs the rest
      value_norm_sink_token                mean value norm of the designated sink token(s)
    """
    if not isinstance(trace, SinkTrace):
        _checks.fail(
            "moving_sink_stats",
            "trace",
            "a SinkTrace (AttentionRecorder.trace())",
            _checks.describe(trace),
            TypeError,
        )
    mass = trace.mass  # (T, NL, B, H, L)
    t_steps, n_layers, b, h, _ = mass.shape
    real = trace.key_padding_mask[:, None, :, None, :]  # (T, 1, B, 1, L)
    flags = detect_sinks(mass, method=method, epsilon=epsilon, k=k, key_padding_mask=real)
    top_mass, top_pos = (mass * real).max(-1)
    top_is_sink = flags.gather(-1, top_pos[..., None])[..., 0]
    series = n_layers * b * h
    pos = top_pos.reshape(t_steps, series)
    valid = top_is_sink.reshape(t_steps, series)
    move_rate, spreads, distinct = _stack_pair_stats(pos, valid)
    per_layer = []
    pos_l = top_pos.reshape(t_steps, n_layers, b * h)
    val_l = top_is_sink.reshape(t_steps, n_layers, b * h)
    for layer in range(n_layers):
        per_layer.append(_stack_pair_stats(pos_l[:, layer], val_l[:, layer])[0])
    vn = trace.value_norm
    vn_real = real.expand_as(vn)
    sink_vals = vn[flags]
    other_vals = vn[~flags & vn_real]
    has_sink_token = trace.sink_mass.shape[-1] > 0
    share = trace.sink_mass.sum(-1)  # (T, NL, B, H)
    return {
        "method": method,
        "sink_rate": float(flags.any(-1).double().mean()),
        "sinks_per_head": float(flags.sum(-1).double().mean()),
        "move_rate": move_rate,
        "move_rate_per_layer": per_layer,
        "position_spread": float(sum(spreads) / len(spreads)) if spreads else math.nan,
        "distinct_positions": float(sum(distinct) / len(distinct)) if distinct else math.nan,
        "top_key_mass": float(top_mass.double().mean()),
        "sink_token_share": float(share.double().mean()) if has_sink_token else math.nan,
        "sink_token_share_per_layer": (
            share.double().mean((0, 2, 3)).tolist() if has_sink_token else []
        ),
        "value_norm_sink": float(sink_vals.double().mean()) if sink_vals.numel() else math.nan,
        "value_norm_other": float(other_vals.double().mean()) if other_vals.numel() else math.nan,
        "value_norm_sink_token": (
            float(trace.sink_value_norm.double().mean())
            if trace.sink_value_norm.numel()
            else math.nan
        ),
    }
