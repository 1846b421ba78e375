"""benchmarks/attention_mass.py end to end at tiny sizes: both mass methods run and agree, and
the JSON holds one row per configuration."""

import json

import torch
from conftest import load_script


def test_tiny_run_agrees_and_writes_rows(tmp_path):
    bench = load_script("benchmarks/attention_mass.py")
    out = tmp_path / "mass.json"
    argv = ["--lengths", "70", "300", "--head-dims", "16", "--tokens", "300", "--heads", "2"]
    assert bench.main([*argv, "--reps", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["dtype"], r["L"]) for r in rows} == {
        (dt, L) for dt in ("float32", "bfloat16") for L in (70, 300)
    }
    for r in rows:
        assert r["max_abs_diff"] < 1e-5
        assert set(r["ms"]) == {"sinkdlm", "dense", "attention"}


def test_dense_form_is_the_mass_definition():
    """The benchmark's reference sums to 1 with the sink per query row, as a softmax does."""
    bench = load_script("benchmarks/attention_mass.py")
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 9, 8, generator=g), torch.randn(1, 2, 9, 8, generator=g)
    sk = torch.randn(2, 8, generator=g)
    scores = torch.cat([q @ sk[None, :, :, None], q @ k.transpose(-1, -2)], -1) * 8**-0.5
    lse = scores.logsumexp(-1)
    mass, sink = bench.dense_mass(q, k, lse, sk, 8**-0.5)
    torch.testing.assert_close(mass.sum(-1) + sink, torch.ones(1, 2))
