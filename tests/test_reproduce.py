import json
import math

import pytest
import torch

import sinkdlm
from sinkdlm import data, demo, reproduce
from sinkdlm.__main__ import main

needs_corpus = pytest.mark.skipif(
    not data.FORTUNES_DIR.is_dir(),
    reason=f"Debian text corpus not installed; run: {data.APT_INSTALL}",
)
needs_generate = pytest.mark.skipif(
    not hasattr(sinkdlm, "generate"), reason="sinkdlm.generate (remask branch) is not in this build"
)

# The smallest configuration that still runs every stage (training, eval, generation, scores).
TINY = [
    "--d-model", "16", "--layers", "1", "--heads", "2", "--kv-heads", "1",
    "--seq-len", "32", "--vocab-size", "512", "--batch-size", "4", "--train-steps", "3",
    "--val-batches", "1", "--samples", "1", "--prompt-len", "8", "--gen-length", "8",
    "--gen-steps", "4", "--threads", "1",
]  # fmt: skip

TINY_EVAL = ["--lambada-examples", "6", "--choice-examples", "5", "--choice-len", "4"]


@pytest.fixture(autouse=True)
def _keep_thread_count():
    # --threads sets torch's process-wide thread count: give the later tests theirs back.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "df, expected", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)]
)
def test_t_quantile_matches_tables(df, expected):
    assert reproduce.t_quantile(0.975, df) == pytest.approx(expected, abs=2e-4)


def test_mean_interval():
    stat = reproduce.mean_interval([1.0, 2.0, 3.0])
    assert stat["mean"] == 2.0 and stat["n"] == 3
    assert stat["half_width"] == pytest.approx(4.3027 * 1.0 / math.sqrt(3), rel=1e-4)
    assert math.isnan(reproduce.mean_interval([1.0, math.nan])["half_width"])  # one finite value
    assert math.isnan(reproduce.mean_interval([None])["mean"])


def test_paired_difference_found_only_when_interval_excludes_zero():
    def rec(loss):
        return {"val_loss": loss, "sinks": {}}

    keys = ["val_loss"]
    metrics = [m for m in reproduce.METRICS if m[0] in keys]
    records = {
        ("baseline", 0): rec(5.0), ("baseline", 1): rec(5.2), ("baseline", 2): rec(4.9),
        ("a", 0): rec(4.0), ("a", 1): rec(4.25), ("a", 2): rec(3.85),  # ~1.0 lower, every seed
        ("b", 0): rec(5.5), ("b", 1): rec(4.7), ("b", 2): rec(5.0),  # mixed signs
    }  # fmt: skip
    old = reproduce.METRICS
    reproduce.METRICS = metrics
    try:
        summary = reproduce.summarize(records, ["baseline", "a", "b"], [0, 1, 2])
    finally:
        reproduce.METRICS = old
    a, b = summary["vs_baseline"]["a"]["val_loss"], summary["vs_baseline"]["b"]["val_loss"]
    assert a["mean"] == pytest.approx(-1.0) and a["found"]
    assert not b["found"]


class _Oracle(torch.nn.Module):
    """Predicts the tokens of the row of ``truth`` whose first ``key`` positions match the input."""

    def __init__(self, truth, key, vocab):
        super().__init__()
        self.truth, self.key, self.vocab = truth, key, vocab

    def forward(self, x):
        match = (x[:, None, : self.key] == self.truth[None, :, : self.key]).all(-1)
        assert bool(match.any(-1).all()), "every input row has its context among the items"
        rows = self.truth[match.float().argmax(-1)]
        logits = torch.nn.functional.one_hot(rows, self.vocab).float() * 20.0
        return type("Out", (), {"logits": logits})()


@needs_corpus
def test_downstream_items_and_scores():
    d = data.load_text_data(seq_len=32, vocab_size=512)
    ids, target = reproduce.lambada_examples(d, 32, 20)
    assert ids.shape == target.shape == (20, 32)
    assert bool((target.sum(-1) >= 1).all())
    # the target is the held-out document's last word, and <|eos|> ends every window
    assert bool((ids[:, -1] == d.eos_id).all())
    word = d.tokenizer.decode(ids[0][target[0]].tolist()).strip()
    assert word.isalpha() and len(word) >= 2
    oracle = _Oracle(ids, 8, d.vocab_size)
    assert reproduce.lambada_accuracy(oracle, ids, target, mask_id=d.mask_id, batch_size=7) == 1.0
    lie = ids.clone()
    lie[target] = (ids[target] + 1) % d.vocab_size
    liar = _Oracle(lie, 8, d.vocab_size)  # right context, wrong last word
    assert reproduce.lambada_accuracy(liar, ids, target, mask_id=d.mask_id) == 0.0

    mc, ending = reproduce.choice_examples(d, 32, 12, choices=4, choice_len=4)
    assert mc.shape == (12, 4, 32) and int(ending.sum()) == 4
    assert bool((mc[:, :, ~ending] == mc[:, :1, ~ending]).all())  # same context for all choices
    assert bool((mc[:, 1:, ending] != mc[:, :1, ending]).any(-1).all())  # distractors differ
    kw = dict(mask_id=d.mask_id, batch_size=5)
    assert reproduce.choice_accuracy(_Oracle(mc[:, 0], 8, d.vocab_size), mc, ending, **kw) == 1.0
    assert reproduce.choice_accuracy(_Oracle(mc[:, 2], 8, d.vocab_size), mc, ending, **kw) == 0.0


@needs_corpus
@needs_generate
def test_miniature_reproduce_and_resume(tmp_path, capsys, monkeypatch):
    out = tmp_path / "rep"
    argv = ["reproduce", "--out", str(out), *TINY, *TINY_EVAL, "--seeds", "2"]
    main([*argv, "--variants", "baseline,sink1"])
    report = json.loads((out / "report.json").read_text())
    assert report["variants"] == ["baseline", "sink1"] and report["seeds"] == [0, 1]
    for name in ("baseline", "sink1"):
        for seed in (0, 1):
            run = json.loads((out / "runs" / f"{name}-seed{seed}.json").read_text())
            assert run["variant"] == name and run["seed"] == seed
            assert 0.0 <= run["lambada_accuracy"] <= 1.0 and 0.0 <= run["choice_accuracy"] <= 1.0
            assert run["lambada_examples"] == 6 and run["choice_examples"] == 5
            assert 0.0 < run["outside_sink_set"] <= 1.0
    per = report["summary"]["per_variant"]
    assert per["baseline"]["val_loss"]["n"] == 2 and math.isfinite(
        per["baseline"]["val_loss"]["half_width"]
    )
    # seeds differ, the variants share the data and masks of a seed
    assert per["baseline"]["val_loss"]["values"][0] != per["baseline"]["val_loss"]["values"][1]
    assert "sink1" in report["summary"]["vs_baseline"]
    assert (out / "reproduce.png").stat().st_size > 10000
    table = (out / "table.md").read_text()
    assert "| val bound (nats/token) |" in table and "difference vs baseline" in table
    assert " ± " in table

    # resume: nothing finished is trained again, and a new variant adds only its own runs
    trained = []
    real = demo.run_variant
    monkeypatch.setattr(
        demo, "run_variant", lambda name, *a: trained.append(name) or real(name, *a)
    )
    main([*argv, "--variants", "baseline,sink1,sink_logit"])
    assert trained == ["sink_logit", "sink_logit"]
    again = json.loads((out / "report.json").read_text())
    assert again["summary"]["per_variant"]["sink1"] == report["summary"]["per_variant"]["sink1"]
    assert "resuming: 4 runs already done" in capsys.readouterr().out

    with pytest.raises(SystemExit, match="other settings.*train_steps"):
        main([*argv, "--variants", "baseline", "--train-steps", "4"])


def test_reproduce_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match="unknown variants"):
        main(["reproduce", "--out", str(tmp_path), "--variants", "baseline,sink3"])
    with pytest.raises(SystemExit, match="--seeds must be >= 1"):
        main(["reproduce", "--out", str(tmp_path), "--seeds", "0"])


def _without_timing(obj):
    if isinstance(obj, dict):
        return {
            k: _without_timing(v)
            for k, v in obj.items()
            if not k.endswith("seconds") and k not in ("out", "plots", "table")
        }
    if isinstance(obj, list):
        return [_without_timing(v) for v in obj]
    return obj


@needs_corpus
@needs_generate
def test_demo_repeats_bit_for_bit(tmp_path):
    # Same machine, same flags: the same report numbers and the same weights, to the bit; on two
    # threads, so that a reduction split across threads in a varying order would show.
    reports, weights = [], []
    for run in ("a", "b"):
        out = tmp_path / run
        main(["demo", "--out", str(out), *TINY, "--threads", "2", "--variants", "baseline,sink1"])
        reports.append(_without_timing(json.loads((out / "report.json").read_text())))
        weights.append([(out / f"{v}.safetensors").read_bytes() for v in ("baseline", "sink1")])
    assert reports[0] == reports[1]
    assert weights[0] == weights[1]
