"""examples/find_sinks.py: records a sink-patched model while it generates, writes the plots."""

import math

import pytest
from conftest import load_script

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")


def test_find_sinks_writes_stats_and_plots(tmp_path):
    example = load_script("examples/find_sinks.py")
    stats = example.main(["--out", str(tmp_path), "--gen_length", "8", "--steps", "4"])
    for name in ("sinks.png", "value_norms.png", "stats.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert 0 < stats["sink_token_share"] < 1  # the sink token was recorded
    assert math.isfinite(stats["value_norm_other"])
