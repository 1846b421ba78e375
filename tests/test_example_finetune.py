"""examples/finetune.py: Trainer fine-tuning with the sink token, then a reload."""

import sys
from pathlib import Path

import pytest
import torch
from conftest import load_script

transformers = pytest.importorskip("transformers")

import sinkdlm.hf  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune.py"


def example_argv(out, *flags, steps=3, batch=2, seq_len=32):
    """examples/finetune.py's command line for a short CPU run saving to ``out``."""
    argv = [str(EXAMPLE), "--output_dir", str(out), "--max_steps", str(steps)]
    argv += ["--batch_size", str(batch), "--seq_len", str(seq_len), "--lr", "1e-2"]
    return [*argv, "--save_steps", "1000", "--use_cpu", *flags]


def test_finetune_trains_the_sink_and_saves_a_reloadable_model(tmp_path, monkeypatch):
    example = load_script("examples/finetune.py")
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", example_argv(out, "--logging_steps", "1", "--train_only_sink"))
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


def test_finetune_packing_trains_on_packed_documents(tmp_path, monkeypatch):
    """--packing: DataCollatorWithFlattening rows (no padding) reach the loss with restarting
    position_ids and the collator's cu_seq_lens, and the sink trains."""
    example = load_script("examples/finetune.py")
    seen = []
    real_loss = example.masked_diffusion_loss

    def spy(model, input_ids, **kwargs):
        seen.append((input_ids.shape, kwargs["position_ids"], kwargs["model_kwargs"]))
        return real_loss(model, input_ids, **kwargs)

    monkeypatch.setattr(example, "masked_diffusion_loss", spy)
    out = tmp_path / "out"
    flags = ("--train_only_sink", "--packing")
    monkeypatch.setattr(sys, "argv", example_argv(out, *flags, steps=2, batch=3, seq_len=48))
    example.main()

    assert len(seen) == 2
    for shape, positions, model_kwargs in seen:
        assert shape[0] == 1  # one packed row of three documents
        cu = model_kwargs["cu_seq_lens_q"].tolist()
        assert len(cu) == 4 and cu[-1] == shape[1]
        starts = (positions[0] == 0).nonzero().flatten().tolist()
        assert starts == cu[:-1]  # positions restart where each document starts
    reloaded = sinkdlm.hf.from_pretrained(out).eval()
    initial = example.tiny_byte_model(seed=0)
    mean_init = initial.get_input_embeddings().weight.mean(0)
    assert not torch.allclose(reloaded.model.sink_embedding.weight, mean_init)


def test_finetune_lora_trains_adapters_and_the_sink_and_reloads(tmp_path, monkeypatch):
    """--lora: PEFT adapters on the linear layers and the sink (modules_to_save) train, the base
    weights stay, and load_lora on a fresh base model gives the trained model's logits."""
    pytest.importorskip("peft")
    example = load_script("examples/finetune.py")
    trained = []

    def keep(model, rank):
        trained.append(example_with_lora(model, rank))
        return trained[-1]

    example_with_lora = example.with_lora
    monkeypatch.setattr(example, "with_lora", keep)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", example_argv(out, "--lora", "4"))
    example.main()

    model = trained[0].eval()
    initial = example.tiny_byte_model(seed=0)
    mean_init = initial.get_input_embeddings().weight.mean(0)
    lora_b, sink = [], None
    for name, param in model.get_base_model().named_parameters():
        if "lora_B" in name:
            lora_b.append(param)
        elif "sink_embedding.modules_to_save" in name:
            sink = param
        elif "lora_" not in name and "sink_embedding" not in name:  # a base weight: unchanged
            original = initial.get_parameter(name.replace(".base_layer", ""))
            torch.testing.assert_close(param, original, rtol=0, atol=0)
    assert len(lora_b) == 2 * 7  # q k v o gate up down in each of the 2 layers
    assert all(p.abs().max() > 0 for p in lora_b)  # B starts at zero: the adapters trained
    assert not torch.allclose(sink, mean_init)  # and so did the sink
    reloaded = example.load_lora(example.tiny_byte_model(seed=0), out).eval()
    ids = torch.randint(0, example.BYTE_VOCAB - 1, (2, 16))
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
