"""benchmarks/reproduce_sizes.py, the sweep behind `sinkdlm reproduce`'s default size, at a
size that runs in seconds: every run trains for the budget, a rerun keeps what is done."""

import json

import pytest
import torch
from conftest import load_script

from sinkdlm import data

TINY = [
    "--heads", "2", "--kv-heads", "1", "--seq-len", "32", "--vocab-size", "512",
    "--batch-size", "4", "--val-batches", "1", "--threads", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def sweep():
    module = load_script("benchmarks/reproduce_sizes.py")
    return module


@pytest.fixture(autouse=True)
def _keep_thread_count():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_unigram_entropy(sweep):
    uniform = torch.arange(8).repeat(4).view(4, 8)
    assert sweep.unigram_entropy(uniform) == pytest.approx(torch.log(torch.tensor(8.0)).item())
    assert sweep.unigram_entropy(torch.zeros(2, 3, dtype=torch.long)) == 0.0


@pytest.mark.skipif(
    not data.FORTUNES_DIR.is_dir(),
    reason=f"Debian text corpus not installed; run: {data.APT_INSTALL}",
)
def test_sweep_runs_each_size_for_the_budget_and_resumes(sweep, tmp_path, capsys):
    out = tmp_path / "sizes.json"
    common = [*TINY, "--budget-seconds", "0.5", "--json", str(out)]
    sweep.main([*common, "--sizes", "1x16", "2x16"])
    result = json.loads(out.read_text())
    rows = {(r["layers"], r["d_model"], r["seed"]): r for r in result["rows"]}
    assert set(rows) == {(1, 16, 0), (2, 16, 0)}
    for r in rows.values():
        # The steps fill the budget at the measured step time; the bound is a real number.
        assert r["train_steps"] == max(1, int(0.5 / r["step_seconds"]))
        assert 0 < r["val_bound"] < 20 and r["train_tokens"] == r["train_steps"] * 4 * 32
    assert rows[(2, 16, 0)]["parameters"] > rows[(1, 16, 0)]["parameters"]
    assert out.with_suffix(".png").is_file()
    # A second seed is added; the first seed's runs are kept as they were, not rerun.
    sweep.main([*common, "--sizes", "1x16", "2x16", "--seeds", "2"])
    again = {(r["layers"], r["d_model"], r["seed"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(again) == set(rows) | {(1, 16, 1), (2, 16, 1)}
    assert again[(1, 16, 0)] == rows[(1, 16, 0)]
    assert "| 2x16 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="budget"):
        sweep.main([*TINY, "--budget-seconds", "0.7", "--json", str(out), "--sizes", "1x16"])
