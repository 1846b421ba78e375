"""sinkdlm.analysis: sink detection, moving-sink statistics, the recorder and its plots."""

import math

import pytest
import torch

from sinkdlm.analysis import (
    AttentionRecorder,
    detect_sinks,
    moving_sink_stats,
    plot_comparison,
    plot_sink_heatmap,
    plot_value_norms,
)
from sinkdlm.analysis.recorder import SinkTrace
from sinkdlm.models import DiffusionLM, variant_config


def test_detect_sinks_criteria():
    mass = torch.tensor([[0.5, 0.1, 0.1, 0.1, 0.1, 0.1], [0.2, 0.2, 0.15, 0.15, 0.15, 0.15]])
    ratio = detect_sinks(mass, method="ratio", epsilon=3.0)
    assert ratio.tolist() == [[True] + [False] * 5, [False] * 6]
    z = detect_sinks(mass, method="zscore", k=2.0)
    assert z.tolist() == [[True] + [False] * 5, [False] * 6]
    # a padded key is never a sink and does not enter the others' mean
    kpm = torch.tensor([[True] * 5 + [False], [True] * 6])
    padded = detect_sinks(torch.tensor([[0.35, 0.1, 0.1, 0.1, 0.1, 0.9]] * 2), key_padding_mask=kpm)
    assert padded.tolist() == [[True] + [False] * 5, [False] * 5 + [True]]
    with pytest.raises(ValueError, match="method must be"):
        detect_sinks(mass, method="max")


def test_detect_sinks_and_stats_name_the_bad_argument():
    """Issue 19: a wrong-shape mask gave a raw expand error, moving_sink_stats(None) an
    AttributeError."""
    mass = torch.rand(2, 6)
    with pytest.raises(ValueError, match=r"detect_sinks: key_padding_mask must be broadcastable "
                       r"to mass's shape \(2, 6\), got shape \(2, 5\)"):  # fmt: skip
        detect_sinks(mass, key_padding_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="detect_sinks: mass must be a floating"):
        detect_sinks(mass.tolist())
    with pytest.raises(TypeError, match="detect_sinks: epsilon must be a real number"):
        detect_sinks(mass, epsilon="3")
    with pytest.raises(TypeError, match=r"moving_sink_stats: trace must be a SinkTrace"):
        moving_sink_stats(None)


def synthetic_trace(positions):
    """One layer, one sequence, one head; a strong sink at positions[t] at step t (-1: none)."""
    t, n = len(positions), 8
    mass = torch.full((t, 1, 1, 1, n), 1.0 / n)
    for step, p in enumerate(positions):
        if p >= 0:
            mass[step, 0, 0, 0] = 0.3 / (n - 1)
            mass[step, 0, 0, 0, p] = 0.7
    return SinkTrace(
        mass=mass,
        sink_mass=torch.zeros(t, 1, 1, 1, 0),
        value_norm=torch.arange(n).float().expand(t, 1, 1, 1, n).clone(),
        sink_value_norm=torch.zeros(t, 1, 1, 0),
        input_ids=torch.zeros(t, 1, n, dtype=torch.long),
        key_padding_mask=torch.ones(t, 1, n, dtype=torch.bool),
        layers=[0],
    )


def test_moving_sink_stats_on_known_trajectory():
    stats = moving_sink_stats(synthetic_trace([2, 2, 5, 5, -1, 5, 1]))
    # pairs with a sink at both steps: (2,2) (2,5) (5,5) (5,1) -> 2 of 4 moved
    assert stats["move_rate"] == 0.5
    assert stats["distinct_positions"] == 3
    pos = torch.tensor([2, 2, 5, 5, 5, 1.0])
    assert stats["position_spread"] == pytest.approx(float(pos.std(unbiased=False)))
    assert stats["sink_rate"] == pytest.approx(6 / 7)
    assert math.isnan(stats["sink_token_share"])
    # value norm of key j is j: sinks are at 2,2,5,5,5,1
    assert stats["value_norm_sink"] == pytest.approx(sum([2, 2, 5, 5, 5, 1]) / 6)
    assert moving_sink_stats(synthetic_trace([3, 3, 3]))["move_rate"] == 0.0


SIZE = dict(vocab_size=41, mask_id=1, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2)


@pytest.mark.parametrize("variant", ["baseline", "sink1", "sink4", "sink_logit", "gate"])
def test_recorder_collects_consistent_trace(variant, tmp_path):
    torch.manual_seed(0)
    model = DiffusionLM(variant_config(variant, **SIZE)).eval()
    ids = torch.randint(2, 41, (2, 12))
    am = torch.ones(2, 12, dtype=torch.bool)
    am[1, 9:] = False
    with AttentionRecorder(model, layers=[0, 2]) as rec, torch.no_grad():
        x = torch.ones_like(ids)  # all masked
        for step in range(4):  # a toy unmasking trajectory, updated in place as samplers do
            model(x, attention_mask=am)
            x[:, step * 3 : step * 3 + 3] = ids[:, step * 3 : step * 3 + 3]
    assert all(m.attention_observer is None for m in model.attention_layers())
    trace = rec.trace()
    n_sinks = {"baseline": 0, "gate": 0, "sink1": 1, "sink4": 4, "sink_logit": 1}[variant]
    assert trace.mass.shape == (4, 2, 2, 4, 12)
    assert trace.sink_mass.shape == (4, 2, 2, 4, n_sinks)
    assert trace.input_ids.shape == (4, 2, 12) and (trace.input_ids[0] == 1).all()
    assert (trace.input_ids[2, :, :6] == ids[:, :6]).all() and (
        trace.input_ids[2, :, 6:] == 1
    ).all()
    # keys + designated sinks hold all attention of every head
    total = trace.mass.sum(-1) + trace.sink_mass.sum(-1)
    torch.testing.assert_close(total, torch.ones_like(total), rtol=1e-5, atol=1e-5)
    assert (trace.mass[:, :, 1, :, 9:] == 0).all()
    # value norms are those of the model's v projection (layer 0: embeddings only)
    x = model.layers[0].attn_norm(model.embed(trace.input_ids[0]))
    v = model.layers[0].attn.v_proj(x).view(2, 12, 2, 8).norm(dim=-1)
    torch.testing.assert_close(trace.value_norm[0, 0, :, 0], v[..., 0], rtol=1e-5, atol=1e-6)
    stats = moving_sink_stats(trace)
    assert (math.isnan(stats["sink_token_share"])) == (n_sinks == 0)
    table = trace.to_dict()
    assert len(table["step"]) == 4 * 2 * 2 * 4 and set(table["layer"]) == {0, 2}
    for fn in (plot_sink_heatmap, plot_value_norms):
        path = fn(trace, tmp_path / f"{fn.__name__}.png")
        assert path.stat().st_size > 5000
    both = plot_comparison({"a": trace, "b": trace}, tmp_path / "cmp.png", mask_id=1)
    assert both.stat().st_size > 10000


def test_recorder_max_steps_and_protocol():
    model = DiffusionLM(variant_config("sink1", **SIZE))
    with pytest.warns(UserWarning, match="max_steps"), AttentionRecorder(model, max_steps=2) as rec:
        for _ in range(3):
            model(torch.randint(2, 41, (1, 5)))
    assert rec.trace().num_steps == 2
    # Without the protocol the recorder watches SDPA calls: a model making none records nothing.
    linear = torch.nn.Linear(2, 2)
    with AttentionRecorder(linear) as rec:
        linear(torch.randn(1, 2))
    with pytest.raises(RuntimeError, match="recorded no step"):
        rec.trace()
