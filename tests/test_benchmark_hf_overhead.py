"""benchmarks/hf_overhead.py end to end on a tiny model: one JSON row per (dtype, shape, mode),
and ``fwd+cache`` times forwards that reuse the cached sink K/V (the sampler's case) instead of
recomputing them each step."""

import json

import pytest
from conftest import load_script

from sinkdlm.hf import patch

TINY = ["--hidden", "32", "--mlp", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2"]


@pytest.mark.parametrize("mode, sink_rows", [("fwd", 2 * (1 + 2)), ("fwd+cache", 2)])
def test_tiny_run_writes_rows_and_the_cached_mode_runs_the_sink_once(
    mode, sink_rows, tmp_path, monkeypatch
):
    """Two layers, a warm-up and two timed forwards of the patched model: without the cache each
    forward runs the sink's row through both layers, with it only the warm-up does."""
    bench = load_script("benchmarks/hf_overhead.py")
    calls = []
    real_call = patch.sink_layer_call
    monkeypatch.setattr(
        patch, "sink_layer_call", lambda *args: calls.append(args[1]) or real_call(*args)
    )
    out = tmp_path / "hf.json"
    argv = [*TINY, "--vocab", "50", "--dtypes", "float32", "--shapes", "2x9", "--modes", mode]
    assert bench.main([*argv, "--reps", "2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["dtype"], r["B"], r["L"], r["mode"]) for r in rows] == [("float32", 2, 9, mode)]
    assert set(rows[0]["ms"]) == {"unpatched", "patched"} and rows[0]["ratio"] > 0
    assert len(calls) == sink_rows, calls
