"""examples/finetune.py: Trainer fine-tuning with the sink token, then a reload."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import sinkdlm.hf  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune.py"


def test_finetune_trains_the_sink_and_saves_a_reloadable_model(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("finetune_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "out"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            str(EXAMPLE),
            "--output_dir",
            str(out),
            "--max_steps",
            "3",
            "--batch_size",
            "2",
            "--seq_len",
            "32",
            "--lr",
            "1e-2",
            "--logging_steps",
            "1",
            "--save_steps",
            "1000",
            "--use_cpu",
            "--train_only_sink",
        ],
    )
    example.main()

    reloaded = sinkdlm.hf.from_pretrained(out).eval()
    assert sinkdlm.hf.has_sink_token(reloaded)
    initial = example.tiny_byte_model(seed=0)
    mean_init = initial.get_input_embeddings().weight.mean(0)
    sink = reloaded.model.sink_embedding.weight
    assert not torch.allclose(sink, mean_init)  # the sink trained ...
    for name, param in initial.named_parameters():  # ... and nothing else did
        torch.testing.assert_close(reloaded.get_parameter(name), param, rtol=0, atol=0)
    ids = torch.randint(0, example.BYTE_VOCAB - 1, (2, 16))
    with torch.no_grad():
        assert reloaded(input_ids=ids).logits.shape == (2, 16, example.BYTE_VOCAB)
