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
        device="cpu", repeats=1, prompt_lengths=[4, 12], block_length=8,
        lm_heads=["full", "sliced"], caches=["prefix", "dual"], no_cache_calls=None,
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
    result = result_of(rows, threshold=[])
    text = bench.table(result)
    assert text.count("\n| 2 | 12 | 16 |") == 6
    bench.plot(result, tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 0


@pytest.mark.parametrize("head", ["full", "sliced"])
@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_mac_count_is_what_generate_multiplies(bench, cache, head):
    """generate_macs (the table's MAC ratio) against torch's FLOP counter over a whole
    generate call of an eager-attention Llama without the sink, whose attention is matmuls."""
    import torch
    import transformers
    from torch.utils.flop_counter import FlopCounterMode

    shape = dict(hidden=32, layers=2, heads=2, kv_heads=1, ffn=64, vocab=64, block_length=8)
    config = transformers.LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], attn_implementation="eager",
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    prompts = torch.randint(0, 63, (3, 5), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        bench.timed_generate(
            model, prompts, full_head=head == "full", gen_length=16, steps=16,
            block_length=8, mask_id=63, cache=None if cache == "none" else cache,
        )  # fmt: skip
    macs = bench.generate_macs(shape, 5, 16, cache, head, sink=False)
    assert counter.get_total_flops() == 2 * 3 * macs  # a multiply-add is two FLOPs, 3 rows


def test_main_writes_the_json_and_png_where_told(bench, tmp_path, monkeypatch):
    import json
    import sys

    monkeypatch.setitem(bench.PRESETS, "small", dict(TINY, heads=2))
    out = tmp_path / "run" / "generate.json"
    argv = ["generate.py", "--skip-threshold", "--repeats", "1", "--prompt-lengths", "4",
            "--block-length", "8", "--heads", "sliced", "--out", str(out)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    result = json.loads(out.read_text())
    assert len(result["speed"]) == 3 and result["speed_settings"]["out"] == str(out)
    assert out.with_suffix(".png").stat().st_size > 0


def test_no_cache_calls_stops_only_the_uncached_runs(bench):
    rows = bench.speed(args(no_cache_calls=5, lm_heads=["sliced"], prompt_lengths=[4]), TINY)
    calls = {r["cache"]: (r["model_calls"], r["timed_calls_only"]) for r in rows}
    assert calls == {"none": (5, True), "prefix": (16, False), "dual": (16, False)}


def result_of(rows, **kw):
    settings = dict(hidden=32, layers=1, heads=2, kv_heads=1, ffn=64, vocab=64, block_length=8)
    settings.update(repeats=1, no_cache_calls=None)
    return dict(speed=rows, speed_settings=settings, settings=settings, cpu="test",
                device="cpu", threads=1, torch="t", **kw)  # fmt: skip


def test_merge_keeps_the_rows_a_run_did_not_time(bench, tmp_path):
    sliced = bench.speed(args(lm_heads=["sliced"], prompt_lengths=[4]), TINY)
    full = bench.speed(args(lm_heads=["full"], prompt_lengths=[4], caches=["prefix"]), TINY)
    assert {r["cache"] for r in full} == {"none", "prefix"}  # the base always runs
    previous, new = result_of(sliced), result_of(full)
    bench.check_mergeable(previous, new)
    rows = bench.merged_speed_rows(previous, new)
    keys = [bench._key(r) for r in rows]
    assert len(keys) == len(set(keys)) == 5  # 3 sliced kept + 2 full timed now
    assert keys == sorted(
        keys, key=lambda k: (k[:3], k[4] == "sliced", ["none", "prefix", "dual"].index(k[3]))
    )
    # A timed configuration replaces the JSON's row for it.
    again = bench.speed(args(lm_heads=["sliced"], prompt_lengths=[4], caches=["dual"]), TINY)
    rows = bench.merged_speed_rows(result_of(rows), result_of(again))
    assert sum(r is again[0] or r is again[1] for r in rows) == 2 and len(rows) == 5
    assert all(r["repeats"] == 1 for r in rows)
    bench.plot(result_of(rows, threshold=[]), tmp_path / "merged.png")  # a missing bar is blank
    assert "| 2 | 4 | 16 | prefix | full |" in bench.table(result_of(rows, threshold=[]))


def test_merge_refuses_rows_of_another_machine_or_model(bench):
    previous, new = result_of([{"params": 1}]), result_of([])
    previous["threads"] = 2
    previous["speed_settings"] = dict(previous["speed_settings"], vocab=128)
    with pytest.raises(SystemExit, match=r"threads \(2 vs 1\), vocab \(128 vs 64\)"):
        bench.check_mergeable(previous, new)
