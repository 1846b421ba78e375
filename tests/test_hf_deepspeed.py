"""DeepSpeed ZeRO-3 training of a sink-patched model: two CPU ranks (gloo), the tiny Llama of
test_hf_fsdp.py, DeepSpeed's CPU accelerator.

ZeRO-3 partitions every parameter, the sink embedding included, and gathers each module's
parameters around its forward and backward calls. Each variant (plain, non-reentrant gradient
checkpointing, LoRA) trains a few steps on half of a global batch per rank; the mean loss, the
final sink embedding and every trained parameter must equal one process training the same model
on the whole batch. The optimizer is SGD, with the gradient's global norm clipped to 1 on both
sides (DeepSpeed computes it over every rank's partition). Not AdamW: Adam divides each entry by
its own magnitude, so an entry near zero (this model has many around 1e-7) turns a rounding
difference of the reduction (about 1e-8 here) into an update difference of up to the learning
rate, with or without the sink (measured on the unpatched model, AdamW at lr 1e-2: parameters
up to 7e-4 apart after one step and 1.5e-2 after two, from gradients equal to 3e-8), so it
would test the reduction's rounding, not the sink. The trained engine's checkpoint
(``save_checkpoint``, each rank its partition) reloads into a fresh engine, and its consolidated
fp32 state dict (``get_fp32_state_dict_from_zero_checkpoint``, saved with ``save_pretrained``)
reloads through ``sinkdlm.hf.from_pretrained``, both to the trained engine's logits.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_hf_fsdp import (
    STEPS,
    WORLD,
    _global_batch,
    _loss,
    _reference_start,
    _tiny_llama,
    _unwrapped,
    _variant,
    run_finetune_probe,
)

pytest.importorskip("transformers")
# DeepSpeed picks its accelerator at first use; these ranks run on the CPU, even beside a GPU.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
deepspeed = pytest.importorskip(
    "deepspeed", reason="DeepSpeed is not installed (the [test] extras install it)"
)

LR = 0.5
CLIP = 1.0  # the gradient's global norm (about 1.8 at the first step here) is clipped to this
# Float32, 2 ranks: the gradient is averaged by a reduce-scatter instead of one backward over the
# whole batch (another summation order); SGD passes the difference on unamplified.
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


def _config():
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": CLIP,  # over every rank's partition: the sink's gradient counts
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,  # a client optimizer (torch's SGD)
    }


def _model(variant):
    import sinkdlm.hf

    return _variant(sinkdlm.hf.add_sink_token(_tiny_llama()), variant)


def _trained_names(model):
    return [name for name, p in model.named_parameters() if p.requires_grad]


def _train(model, step_fn, rows):
    ids, targets = _global_batch()
    losses = []
    for step in range(STEPS):
        losses.append(step_fn(_loss(model, ids[step, rows], targets[step, rows])))
    return losses


def _reference(variant):
    """One process, the whole global batch: the losses and the trained parameters."""
    model = _model(variant)
    if variant == "checkpointing":  # the reference runs without: checkpointing changes nothing
        model.gradient_checkpointing_disable()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)

    def step(loss):
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], CLIP)
        optimizer.step()
        return loss.item()

    losses = _train(model, step, slice(None))
    named = dict(model.named_parameters())
    return losses, {name: named[name].detach().clone() for name in _trained_names(model)}


def _engine(variant):
    """``zero_init``: the model built partitioned (under ``deepspeed.zero.Init``, as the Trainer's
    ``from_pretrained`` loads it under a ZeRO-3 config), then patched; the engine partitions the
    sink embedding when it is built. Its reference is the plain model."""
    if variant == "zero_init":
        import sinkdlm.hf

        # Built first outside zero.Init (which also imports modeling_llama outside it: zero.Init
        # replaces tensor construction, which breaks the import of torch._dynamo that
        # transformers' lazy import runs), then loaded into the partitioned model the way
        # from_pretrained does under ZeRO-3 (zero.Init skips transformers' weight init).
        weights = _tiny_llama().state_dict()
        with deepspeed.zero.Init(config_dict_or_path=_config()):
            base = _tiny_llama()
        for name, param in base.named_parameters():
            assert hasattr(param, "ds_id") and param.numel() == 0, name  # partitioned
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                param.data.copy_(weights[name])
        model = sinkdlm.hf.add_sink_token(base).train()
    else:
        model = _model(variant)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=_config())
    assert all(hasattr(p, "ds_id") for p in engine.module.parameters())  # the sink's too
    return engine


def _check_training(engine, variant, rank):
    from deepspeed.utils import safe_get_full_fp32_param

    def step(loss):
        engine.backward(loss)
        engine.step()
        loss = loss.detach()
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        return loss.item()

    losses = _train(engine, step, slice(2 * rank, 2 * rank + 2))
    want_losses, want_params = _reference(variant)
    torch.testing.assert_close(losses, want_losses, **TOLERANCE, msg=variant)
    named = dict(engine.module.named_parameters())
    sink_names = [name for name in want_params if "sink_embedding" in name]
    assert len(sink_names) == 1, sink_names  # the sink trains in every variant (LoRA: saved)
    start = dict(_model(variant).named_parameters())[sink_names[0]]
    for name, want in want_params.items():
        got = safe_get_full_fp32_param(named[name])  # collective: every rank asks
        torch.testing.assert_close(got, want, **TOLERANCE, msg=f"{variant}: {name}")
    sink = safe_get_full_fp32_param(named[sink_names[0]])
    assert not torch.allclose(sink, start, rtol=0, atol=1e-4), f"{variant}: the sink never moved"


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _check_checkpoints(engine, rank, out_dir):
    """The engine's partitioned checkpoint and its consolidated fp32 state dict reload to the
    trained engine's logits."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    import sinkdlm.hf

    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(5))
    engine.eval()
    want = _logits(engine, ids)
    engine.save_checkpoint(out_dir, tag="trained")
    fresh = _engine("plain")
    fresh.eval()  # (a DeepSpeedEngine's eval returns None)
    assert not torch.equal(_logits(fresh, ids), want)  # fresh weights differ ...
    fresh.load_checkpoint(out_dir, tag="trained")
    torch.testing.assert_close(_logits(fresh, ids), want, rtol=0, atol=0)  # ... till loaded
    if rank == 0:
        state = get_fp32_state_dict_from_zero_checkpoint(out_dir, tag="trained")
        assert any(key.endswith("sink_embedding.weight") for key in state)
        unwrapped = _reference_start()
        unwrapped.load_state_dict(state)
        full_dir = os.path.join(out_dir, "full")
        unwrapped.save_pretrained(full_dir)
        reloaded = sinkdlm.hf.from_pretrained(full_dir).eval()
        assert sinkdlm.hf.has_sink_token(reloaded)
        # Float32 rounding only first: safetensors' memory map leaves the (equal) weights at
        # other alignments, where the BLAS may round differently (test_hf_fsdp.py); then bit for
        # bit with the same weights in freshly allocated memory.
        torch.testing.assert_close(_logits(reloaded, ids), want, rtol=1e-5, atol=1e-6)
        for param in reloaded.parameters():
            param.data = param.data.clone()
        torch.testing.assert_close(_logits(reloaded, ids), want, rtol=0, atol=0)
    dist.barrier()


def _check_partitioned_reload(full_dir):
    """``sinkdlm.hf.from_pretrained`` with a ZeRO-3 config active (``HfDeepSpeedConfig``, what
    ``TrainingArguments(deepspeed=...)`` sets up): transformers loads the checkpoint partitioned,
    and the saved sink embedding is restored onto it, equal to an unpartitioned reload's."""
    from transformers.integrations import HfDeepSpeedConfig

    import sinkdlm.hf

    want = sinkdlm.hf.from_pretrained(full_dir).model.sink_embedding.weight
    ds_config = HfDeepSpeedConfig(_config())  # transformers holds it weakly: keep it alive
    model = sinkdlm.hf.from_pretrained(full_dir)
    del ds_config
    sink = model.model.sink_embedding.weight
    others = [n for n, p in model.named_parameters() if p is not sink and not hasattr(p, "ds_id")]
    assert not others, others  # loaded partitioned; the sink waits for the engine
    torch.testing.assert_close(sink, want, rtol=0, atol=0)


def _check_patching_a_partitioned_model_raises():
    import sinkdlm.hf

    model = _tiny_llama()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=_config())
    with pytest.raises(ValueError, match="before a DeepSpeed ZeRO-3 engine wraps the model"):
        sinkdlm.hf.add_sink_token(engine.module)


def _run_rank(rank, out_dir):
    from conftest import rendezvous

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    deepspeed.init_distributed(
        dist_backend="gloo",
        auto_mpi_discovery=False,
        init_method=rendezvous(out_dir),
        rank=rank,
        world_size=WORLD,
    )
    torch.set_num_threads(1)
    try:
        for variant in ("plain", "checkpointing", "lora", "zero_init"):
            engine = _engine(variant)
            assert len(_trained_names(_unwrapped(engine.module))) > 0
            _check_training(engine, variant, rank)
            if variant == "plain":
                _check_checkpoints(engine, rank, os.path.join(out_dir, "zero3"))
                _check_partitioned_reload(os.path.join(out_dir, "zero3", "full"))
        _check_patching_a_partitioned_model_raises()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_zero3_training_equals_one_process_and_checkpoints_reload(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(_run_rank, args=(str(tmp_path),), nprocs=WORLD, join=True)


ZERO3_CHECK = """
import sinkdlm.hf

# The example creates its TrainingArguments first, so from_config loads the model partitioned
# (deepspeed.zero.Init), and add_sink_token receives it so.
partitioned_when_patched = []
_add_sink_token = sinkdlm.hf.add_sink_token

def recording_add_sink_token(model, **kwargs):
    partitioned_when_patched.append(all(hasattr(p, "ds_id") for p in model.parameters()))
    return _add_sink_token(model, **kwargs)

sinkdlm.hf.add_sink_token = recording_add_sink_token

def check(model):
    assert partitioned_when_patched == [True], partitioned_when_patched
    # the Trainer's model: a ZeRO-3 engine, every parameter (the sink's too) partitioned
    assert type(model).__name__ == "DeepSpeedEngine", type(model)
    assert model.zero_optimization_stage() == 3
    names = [n for n, p in model.named_parameters() if not hasattr(p, "ds_id")]
    assert not names, names
    assert any("sink_embedding" in n for n, _ in model.named_parameters())
"""


def test_finetune_example_trains_under_zero3_with_the_shipped_config(tmp_path):
    """examples/finetune.py --deepspeed examples/deepspeed_zero3.json under torchrun, 2 CPU
    ranks: the model loads partitioned (zero.Init) and is patched so, the Trainer's ZeRO-3
    engine partitions the sink with it, the sink trains, and the final save
    (stage3_gather_16bit_weights_on_model_save) reloads with the sink."""
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "examples" / "deepspeed_zero3.json"
    launcher = ["torch.distributed.run", "--nproc_per_node", str(WORLD)]
    launcher += ["--standalone"]  # torchrun binds a free port itself
    example_args = ["--deepspeed", str(config), "--use_cpu"]
    run_finetune_probe(tmp_path, ZERO3_CHECK, launcher, example_args)
