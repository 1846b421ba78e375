"""benchmarks/generate.py's speed part on a model that runs in a second: every configuration is
timed, the uncached runs stop at --no-cache-calls, and the table and plot are written."""

import argparse

import pytest
from conftest import load_script

TINY = dict(
    hidden=32, layers=1, heads=2, kv_heads=1, ffn=64, vocab=64, batches=[2], gen_lengths=[16]
)

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bench():
    module = load_script("benchmarks/generate.py")
    return module


def args(**kw):
    base = dict(
        device="cpu", repeats=1, prompt_lengths=[4, 12], block_length=8, heads=["full", "sliced"],
        no_cache_calls=None,
    )  # fmt: skip
    return argparse.Namespace(**{**base, **kw})


def test_speed_rows_cover_every_configuration(bench, tmp_path):
    rows = bench.speed(args(), TINY)
    keys = {bench._key(r) for r in rows}
    assert len(keys) == len(rows) == 2 * 2 * 3  # prompts x heads x cache modes
    for r in rows:
        assert r["model_calls"] == 16 and not r["timed_calls_only"]  # one token per step
        assert r["tokens_per_s"] > 0 and r["tokens_per_cpu_s"] > 0
        if r["cache"] == "none":
            assert r["vs_no_cache"] == 1.0
    result = dict(speed=rows, threshold=[], cpu="test", device="cpu", threads=1)
    text = bench.table(result)
    assert text.count("\n| 2 | 12 | 16 |") == 6
    bench.plot(result, tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 0


def test_no_cache_calls_stops_only_the_uncached_runs(bench):
    rows = bench.speed(args(no_cache_calls=5, heads=["sliced"], prompt_lengths=[4]), TINY)
    calls = {r["cache"]: (r["model_calls"], r["timed_calls_only"]) for r in rows}
    assert calls == {"none": (5, True), "prefix": (16, False), "dual": (16, False)}
