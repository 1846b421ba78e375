"""examples/find_sinks.py: records a sink-patched model while it generates, writes the plots."""

import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "find_sinks.py"


def test_find_sinks_writes_stats_and_plots(tmp_path):
    spec = importlib.util.spec_from_file_location("find_sinks_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    stats = example.main(["--out", str(tmp_path), "--gen_length", "8", "--steps", "4"])
    for name in ("sinks.png", "value_norms.png", "stats.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert 0 < stats["sink_token_share"] < 1  # the sink token was recorded
    assert math.isfinite(stats["value_norm_other"])
