"""benchmarks/attention_cuda.py on a machine without a GPU: its --dry-run runs every method on
the CPU with tiny sizes (and they must agree), and a plain run refuses clearly."""

import json

import pytest
import torch
from conftest import load_script


@pytest.fixture(scope="module")
def bench():
    module = load_script("benchmarks/attention_cuda.py")
    return module


def test_dry_run_runs_every_method_and_they_agree(bench, tmp_path):
    out = tmp_path / "dry.json"
    assert bench.main(["--dry-run", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    assert {(r["H"], r["Hkv"]) for r in rows} == {(4, 4), (4, 2)}  # GQA too
    for r in rows:
        assert {"sinkdlm", "sdpa_nosink", "concat_flash"} <= set(r["ms"])
        if r["mode"] == "fwd":
            assert "flex" in r["ms"]  # (FlexAttention has no CPU backward)
        for name, diff in r["max_abs_diff_vs_sinkdlm"].items():
            assert diff < 1e-5, (name, r)
        assert r["speed_vs_sdpa_nosink"] > 0 and r["speed_vs_best_concat"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the benchmark would run")
def test_refuses_without_a_gpu(bench, capsys):
    assert bench.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
