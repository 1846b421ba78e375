import json

import pytest

import sinkdlm
from sinkdlm import data
from sinkdlm.__main__ import main

pytestmark = [
    pytest.mark.skipif(
        not data.FORTUNES_DIR.is_dir(),
        reason=f"Debian text corpus not installed; run: {data.APT_INSTALL}",
    ),
    pytest.mark.skipif(
        not hasattr(sinkdlm, "generate"),
        reason="sinkdlm.generate (remask branch) is not in this build",
    ),
]


def test_demo_small_run(tmp_path, capsys):
    out = tmp_path / "demo"
    main(
        [
            "demo",
            "--out",
            str(out),
            "--d-model",
            "32",
            "--layers",
            "2",
            "--heads",
            "2",
            "--kv-heads",
            "1",
            "--seq-len",
            "32",
            "--vocab-size",
            "512",
            "--batch-size",
            "4",
            "--train-steps",
            "6",
            "--val-batches",
            "2",
            "--samples",
            "2",
            "--prompt-len",
            "8",
            "--gen-length",
            "8",
            "--gen-steps",
            "8",
            "--variants",
            "baseline,sink1,sink_logit",
        ]
    )
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    variants = report["variants"]
    assert list(variants) == ["baseline", "sink1", "sink_logit"]
    # same validation masks for every model
    assert len({v["val_masked_tokens"] for v in variants.values()}) == 1
    for name, v in variants.items():
        assert 0.0 < v["val_loss"] < 20.0 and 0.0 <= v["val_masked_accuracy"] <= 1.0
        assert v["recorded_steps"] == 8
        assert len(v["samples"]) == 2 and all("_" not in s["completion"] for s in v["samples"])
        assert (out / f"{name}.safetensors").is_file()
        assert name in printed
    assert variants["baseline"]["sinks"]["sink_token_share"] is None  # no sink token: nan -> null
    assert 0.0 < variants["sink1"]["sinks"]["sink_token_share"] < 1.0
    for path in report["plots"].values():
        assert (out / path.split("/")[-1]).stat().st_size > 5000
    assert "val loss (ELBO bound" in printed and str(out.resolve()) in printed


def test_cli_rejects_unknown_variant(tmp_path):
    with pytest.raises(SystemExit, match="unknown variants"):
        main(["demo", "--out", str(tmp_path), "--variants", "baseline,sink3"])


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    assert "--variants" in capsys.readouterr().out
