"""Sharded data parallel training of a sink-patched model: two CPU ranks (gloo), a tiny Llama.

Each wrapper (FSDP2's fully_shard, patched before or after wrapping; FSDP1 with use_orig_params)
trains a few AdamW steps on half of a global batch per rank; the mean of the ranks' losses and
the final sink embedding must equal a single process training the same model on the whole batch
(float32, within LOSS_TOLERANCE), also with non-reentrant gradient checkpointing and with LoRA.
The trained model's sharded checkpoint (torch.distributed.checkpoint) and full state dict
(save_pretrained, reloaded by sinkdlm.hf.from_pretrained) give the wrapped model's logits.
"""

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

STEPS = 3
WORLD = 2
# Float32, 2 ranks: the gradient is averaged by a reduce-scatter instead of one backward over the
# whole batch (different summation order), then amplified by three AdamW steps at lr 1e-2.
LOSS_TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def _tiny_llama():
    from conftest import TINY_HF_CONFIG

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**TINY_HF_CONFIG, "num_hidden_layers": 3})
    return transformers.LlamaForCausalLM(config)


def _global_batch():
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 128, (STEPS, 2 * WORLD, 12), generator=gen)
    targets = torch.randint(0, 128, (STEPS, 2 * WORLD, 12), generator=gen)
    return ids, targets


def _loss(model, ids, targets):
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _train(model, rows, sharded):
    """STEPS AdamW steps on ``rows`` of each global batch; the losses (averaged over the ranks
    when ``sharded``)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, targets = _global_batch()
    losses = []
    for step in range(STEPS):
        loss = _loss(model, ids[step, rows], targets[step, rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss = loss.detach()
        if sharded:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        losses.append(loss.item())
    return losses


def _full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _variant(model, variant):
    """The model as the variant trains it: with LoRA (the sink saved beside the adapter) or with
    non-reentrant gradient checkpointing."""
    if variant == "lora":
        import peft

        torch.manual_seed(1)
        config = peft.LoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["sink_embedding"]
        )
        return peft.get_peft_model(model, config)
    if variant == "checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def _sink_weight(model):
    import sinkdlm.hf
    from sinkdlm.hf import patch

    assert sinkdlm.hf.has_sink_token(model)
    sink = patch._state(model).host.sink_embedding
    weights = [p for n, p in sink.named_parameters() if "original_module" not in n]
    return _full(weights[0].detach())


def _reference(variant, sink_first=True):
    import sinkdlm.hf

    model = _tiny_llama()
    model = _variant(sinkdlm.hf.add_sink_token(model), variant)
    if variant == "checkpointing":  # the reference runs without: checkpointing changes nothing
        model.gradient_checkpointing_disable()
    return _train(model, slice(None), sharded=False), _sink_weight(model)


def _fsdp2(order, variant):
    from torch.distributed.fsdp import fully_shard

    import sinkdlm.hf

    model = _tiny_llama()
    if order == "patch, then fully_shard":
        model = _variant(sinkdlm.hf.add_sink_token(model), variant)
    layers = _unwrapped(model).model.layers
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    if order == "fully_shard, then patch":
        sinkdlm.hf.add_sink_token(model)
        model = _variant(model, variant)
    return model


def _fsdp1(variant):
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    import sinkdlm.hf

    model = _variant(sinkdlm.hf.add_sink_token(_tiny_llama()), variant)
    return FullyShardedDataParallel(
        model,
        auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
        use_orig_params=True,
        device_id=torch.device("cpu"),
    )


def _unwrapped(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _check_training(wrapped, variant, rank, name):
    rows = slice(2 * rank, 2 * rank + 2)
    losses = _train(wrapped, rows, sharded=True)
    want_losses, want_sink = _reference(variant)
    torch.testing.assert_close(losses, want_losses, **LOSS_TOLERANCE, msg=name)
    if type(wrapped).__name__ == "FullyShardedDataParallel":  # FSDP1 holds shards outside forward
        with wrapped.summon_full_params(wrapped):
            sink = _sink_weight(wrapped).clone()
    else:
        sink = _sink_weight(wrapped)
    assert not torch.allclose(sink, _sink_weight(_reference_start()), rtol=0, atol=1e-4), name
    torch.testing.assert_close(sink, want_sink, **LOSS_TOLERANCE, msg=name)


def _reference_start():
    import sinkdlm.hf

    return sinkdlm.hf.add_sink_token(_tiny_llama())


def _check_checkpoints(model, rebuild, rank, out_dir):
    """Sharded (torch.distributed.checkpoint) and full state dicts reload to the same logits."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    import sinkdlm.hf

    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    sharded_dir = os.path.join(out_dir, "sharded")
    dcp.save(get_model_state_dict(model), checkpoint_id=sharded_dir)
    fresh = rebuild()
    state = get_model_state_dict(fresh)
    dcp.load(state, checkpoint_id=sharded_dir)
    set_model_state_dict(fresh, state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, want, rtol=0, atol=0)

    # cpu_offload=True segfaults under FSDP1 on CPU, with or without the sink (torch 2.13); the
    # model is on the CPU already
    options = StateDictOptions(full_state_dict=True)
    full = get_model_state_dict(model, options=options)
    full_dir = os.path.join(out_dir, "full")
    if rank == 0:
        assert any(key.endswith("sink_embedding.weight") for key in full)
        unwrapped = _reference_start()
        unwrapped.load_state_dict(full)
        unwrapped.save_pretrained(full_dir)
        reloaded = sinkdlm.hf.from_pretrained(full_dir).eval()
        weights = reloaded.state_dict()
        assert any(key.endswith("sink_embedding.weight") for key in weights)
        for key, value in full.items():  # the gathered weights, bit for bit
            assert torch.equal(weights[key], value), key
        with torch.no_grad():
            # Float32 rounding only: the reloaded weights are equal but sit where safetensors'
            # memory map puts them, and the BLAS may take another code path for other alignments
            # (seen on an AMD EPYC: 1.5e-7 apart; an Intel Xeon gave identical bits).
            torch.testing.assert_close(reloaded(input_ids=ids).logits, want, rtol=1e-5, atol=1e-6)
            for param in reloaded.parameters():  # the same weights in freshly allocated memory
                param.data = param.data.clone()
            torch.testing.assert_close(reloaded(input_ids=ids).logits, want, rtol=0, atol=0)
    dist.barrier()


def _run_rank(rank, out_dir, wrapper):
    from conftest import rendezvous

    from sinkdlm.hf import patch

    dist.init_process_group("gloo", init_method=rendezvous(out_dir), rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        if wrapper == "fsdp2":
            for order in ("patch, then fully_shard", "fully_shard, then patch"):
                for variant in ("plain", "checkpointing", "lora"):
                    if order.startswith("fully_shard") and variant != "plain":
                        continue
                    model = _fsdp2(order, variant)
                    _check_training(model, variant, rank, f"FSDP2 {order} {variant}")
                    if variant == "plain":
                        path = os.path.join(out_dir, order.split(",")[0])
                        rebuild = lambda order=order: _fsdp2(order, "plain")  # noqa: E731
                        _check_checkpoints(model, rebuild, rank, path)
        else:
            for variant in ("plain", "checkpointing", "lora"):
                model = _fsdp1(variant)
                _check_training(model, variant, rank, f"FSDP1 {variant}")
                if variant == "plain":
                    path = os.path.join(out_dir, "fsdp1")
                    _check_checkpoints(model, lambda: _fsdp1("plain"), rank, path)
            from torch.distributed.fsdp import FullyShardedDataParallel

            wrapped_first = FullyShardedDataParallel(
                copy.deepcopy(_tiny_llama()), use_orig_params=True, device_id=torch.device("cpu")
            )
            with pytest.raises(ValueError, match="before wrapping the model in FSDP1"):
                patch.add_sink_token(wrapped_first)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("wrapper", ["fsdp2", "fsdp1"])
def test_sharded_training_equals_one_process_and_checkpoints_reload(wrapper, tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(_run_rank, args=(str(tmp_path), wrapper), nprocs=WORLD, join=True)


# A probe runs examples/finetune.py (argv[1]) with its Trainer's compute_loss first calling the
# probe's check(model) (the model as the Trainer hands it over, wrapped by the launcher's choice);
# with LOSS_LOG set, each rank writes its own losses, unrounded, to LOSS_LOG.<rank> as JSON.
FINETUNE_PROBE = """
import importlib.util, json, os, sys

spec = importlib.util.spec_from_file_location("finetune_example", sys.argv[1])
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)
compute_loss = example.MaskedDiffusionTrainer.compute_loss

losses = []
rank = int(os.environ.get("RANK", "0"))
record_dir, replay_dir = os.environ.get("RECORD_DIR"), os.environ.get("REPLAY_DIR")
recorded = []
replayed = None
if replay_dir:  # every rank's recorded steps, rank by rank
    import glob, torch
    files = sorted(glob.glob(os.path.join(replay_dir, "steps.*.pt")))
    replayed = [torch.load(f, weights_only=False) for f in files]

def checked_compute_loss(self, model, inputs, **kwargs):
    check(model)
    if replayed is not None:
        # One process on the recorded global batch: each rank's inputs with the random state that
        # drew its masks, the loss their mean (what averaging the ranks' gradients optimises).
        import torch
        step = len(losses)
        halves = []
        for steps in replayed:
            step_inputs, rng = steps[step]
            torch.set_rng_state(rng)
            halves.append(compute_loss(self, model, step_inputs, **kwargs))
        losses.append([h.item() for h in halves])
        return torch.stack(halves).mean()
    if record_dir:
        import torch
        recorded.append(({k: v.clone() for k, v in inputs.items()}, torch.get_rng_state()))
        torch.save(recorded, os.path.join(record_dir, f"steps.{rank}.pt"))
    loss = compute_loss(self, model, inputs, **kwargs)
    losses.append(loss.item())
    return loss

example.MaskedDiffusionTrainer.compute_loss = checked_compute_loss
train = example.MaskedDiffusionTrainer.train

def logged_train(self, *args, **kwargs):
    result = train(self, *args, **kwargs)
    if os.environ.get("LOSS_LOG"):
        with open(f"{os.environ['LOSS_LOG']}.{self.args.process_index}", "w") as log:
            json.dump(losses, log)
    return result

example.MaskedDiffusionTrainer.train = logged_train
sys.argv = sys.argv[1:]
example.main()
# This rank's run is over (trained, saved, process group destroyed): see run_finetune_probe.
marker = f"finished.{os.environ.get('RANK', '0')}.of.{os.environ.get('WORLD_SIZE', '1')}"
open(os.path.join(os.path.dirname(os.path.abspath(__file__)), marker), "w").close()
"""

# What a rank's C++ runtime prints when a thread object is destroyed still running, here at
# interpreter exit after the run had finished on every rank (seen once under DeepSpeed's ZeRO-3
# on CPU, in its teardown, 2026-12-04): the only failure run_finetune_probe lets pass, and only
# when every rank had finished its work.
TEARDOWN_ABORT = "terminate called without an active exception"


def _finished_every_rank(tmp_path):
    """Every rank wrote its marker once example.main() had returned."""
    markers = [path.name.split(".") for path in tmp_path.glob("finished.*.of.*")]
    worlds = {int(m[3]) for m in markers}
    return len(worlds) == 1 and {int(m[1]) for m in markers} == set(range(worlds.pop()))


def test_a_teardown_abort_passes_only_when_every_rank_finished(tmp_path):
    assert not _finished_every_rank(tmp_path)
    (tmp_path / "finished.1.of.2").touch()
    assert not _finished_every_rank(tmp_path)  # rank 0 never got there
    (tmp_path / "finished.0.of.2").touch()
    assert _finished_every_rank(tmp_path)


def run_finetune_probe(tmp_path, check, launcher, example_args, env=None):
    """``python -m <launcher...> probe.py examples/finetune.py`` for 3 steps of a tiny model, the
    probe's ``check`` source (defining check(model)) run on the Trainer's model; then the saved
    model reloads with the sink token and a sink that trained."""
    import subprocess
    import sys
    from pathlib import Path

    import sinkdlm.hf

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "probe.py").write_text(check + FINETUNE_PROBE)
    out = tmp_path / "out"
    command = [sys.executable, *(["-m", *launcher] if launcher else []), str(tmp_path / "probe.py")]
    command += [str(root / "examples" / "finetune.py"), "--output_dir", str(out)]
    command += ["--max_steps", "3", "--batch_size", "2", "--seq_len", "32", "--lr", "1e-2"]
    command += ["--logging_steps", "1", "--save_steps", "1000", *example_args]
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    finished_then_aborted = TEARDOWN_ABORT in done.stderr and _finished_every_rank(tmp_path)
    assert done.returncode == 0 or finished_then_aborted, done.stdout[-3000:] + done.stderr[-3000:]
    initial = sinkdlm.hf.add_sink_token(_example_model())
    start = initial.model.sink_embedding.weight
    if "--lora" in example_args:  # the adapters and the sink (modules_to_save) onto the base
        example = _example()
        reloaded = example.load_lora(example.tiny_byte_model(seed=0), out)
        trained = reloaded.get_base_model().model.sink_embedding.modules_to_save.default.weight
        lora_b = [p for n, p in reloaded.named_parameters() if "lora_B" in n]
        assert lora_b and all(p.abs().max() > 0 for p in lora_b)  # B starts at zero
    else:
        reloaded = sinkdlm.hf.from_pretrained(out)
        trained = reloaded.model.sink_embedding.weight
    assert sinkdlm.hf.has_sink_token(reloaded)
    assert trained.shape == start.shape and not torch.allclose(trained, start)


ACCELERATE_CHECK = """
import os
from torch.distributed.fsdp import FSDPModule

def check(model):
    if os.environ["EXPECTED_WRAPPER"] == "fsdp2":
        # accelerate's FSDP2 wrap: the root, each decoder layer and (its own choice, seen on 2
        # CPU ranks with its state forced to FSDP) the embedding, the final norm and the LM head
        wrapped = [type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule)]
        assert isinstance(model, FSDPModule), wrapped
        assert wrapped.count("FSDPLlamaDecoderLayer") == 2, wrapped
    else:
        assert type(model).__name__ == "DistributedDataParallel", type(model)
"""


# accelerate never applies its FSDP plugin to a multi-process CPU run (its state stays MULTI_CPU,
# so the Trainer gets DDP). This switches the state to FSDP once accelerate has set it up, which is
# the one thing a GPU run does differently: the CPU run then goes through accelerate's own FSDP2
# preparation of the model and the Trainer's FSDP save of the full state dict.
FORCE_ACCELERATE_FSDP = """
import accelerate.state as accelerate_state

_init = accelerate_state.AcceleratorState.__init__

def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    cpu = accelerate_state.DistributedType.MULTI_CPU
    if fsdp_plugin is not None and self.distributed_type == cpu:
        self.distributed_type = accelerate_state.DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        accelerate_state.PartialState._shared_state["distributed_type"] = self.distributed_type

accelerate_state.AcceleratorState.__init__ = _fsdp_on_cpu
"""


# the example's extra flags per forced-FSDP2 CPU mode
FSDP2_CPU_MODES = {
    "cpu-fsdp2": [],
    "cpu-fsdp2-checkpointing": ["--gradient_checkpointing"],
    "cpu-fsdp2-packing": ["--packing"],
    "cpu-fsdp2-lora": ["--lora", "4"],
}


def _accelerate_run(mode, tmp_path, env=None):
    """examples/finetune.py under accelerate launch with examples/accelerate_fsdp2.yaml on 2
    processes, in ``mode`` (see the test below), checked by run_finetune_probe."""
    from pathlib import Path

    from conftest import free_port

    root = Path(__file__).resolve().parents[1]
    config = (root / "examples" / "accelerate_fsdp2.yaml").read_text()
    config = config.replace("num_processes: 8", "num_processes: 2").replace("bf16", "'no'")
    if mode != "cuda":
        # without use_cpu here and in TrainingArguments the Trainer, told FSDP is on, leaves the
        # model unwrapped while accelerate does not shard it: each process would train alone
        config = config.replace("use_cpu: false", "use_cpu: true")
    (tmp_path / "fsdp2.yaml").write_text(config)
    launcher = ["accelerate.commands.launch", "--config_file", str(tmp_path / "fsdp2.yaml")]
    launcher += ["--main_process_port", str(free_port())]
    example_args = ["--use_cpu", *FSDP2_CPU_MODES.get(mode, [])] if mode != "cuda" else []
    env = dict(env or {}, EXPECTED_WRAPPER="ddp" if mode == "cpu-ddp" else "fsdp2")
    check = ACCELERATE_CHECK + (FORCE_ACCELERATE_FSDP if mode in FSDP2_CPU_MODES else "")
    run_finetune_probe(tmp_path, check, launcher, example_args, env)


@pytest.mark.parametrize("mode", ["cpu-ddp", *FSDP2_CPU_MODES, "cuda"])
def test_accelerate_launch_trains_the_finetune_example(mode, tmp_path):
    """examples/finetune.py under `accelerate launch --config_file examples/accelerate_fsdp2.yaml`
    on 2 processes: the sink trains and the saved model reloads with it. On CUDA the Trainer's
    model is FSDP2-sharded per decoder layer. On CPU accelerate never applies its FSDP plugin
    (multi-process CPU runs are MULTI_CPU: DDP with use_cpu in the config and the
    TrainingArguments), so "cpu-ddp" runs that path as a user on CPU gets it, and "cpu-fsdp2"
    forces accelerate's state to FSDP (FORCE_ACCELERATE_FSDP) to run its FSDP2 path and the
    Trainer's FSDP save on CPU, also with the example's --gradient_checkpointing, --packing
    (padding-free rows through DataCollatorWithFlattening, the README's command) and --lora
    (PEFT adapters and the sink saved, reloaded onto a fresh base). The losses are compared in
    the next test."""
    pytest.importorskip("accelerate")
    if mode == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip("accelerate applies its FSDP plugin only on accelerators: needs 2 GPUs")
    _accelerate_run(mode, tmp_path)


def test_accelerate_fsdp2_trains_to_the_losses_of_one_process_and_of_accelerate_ddp(tmp_path):
    """The same command, the same 2 ranks, seeds and batches: accelerate's FSDP2 (forced on CPU)
    and its DDP give each rank the same loss at each of 3 steps, to LOSS_TOLERANCE (a
    reduce-scatter instead of an all-reduce). And one process, fed each step's global batch (both
    ranks' recorded inputs, each with the random state that drew its masks, the loss their mean)
    by the example's own Trainer (the same optimizer, schedule and clipping), gives each half the
    FSDP2 rank's loss at every step."""
    pytest.importorskip("accelerate")
    import json

    def rank_losses(run_dir, ranks):
        return torch.tensor(
            [json.loads((run_dir / f"losses.json.{r}").read_text()) for r in ranks],
            dtype=torch.float64,
        )

    losses = {}
    for mode in ("cpu-ddp", "cpu-fsdp2"):
        (tmp_path / mode).mkdir()
        env = dict(LOSS_LOG=str(tmp_path / mode / "losses.json"), RECORD_DIR=str(tmp_path / mode))
        _accelerate_run(mode, tmp_path / mode, env=env)
        losses[mode] = rank_losses(tmp_path / mode, (0, 1))
    assert losses["cpu-ddp"].shape == (2, 3), losses
    assert not torch.allclose(losses["cpu-ddp"][0], losses["cpu-ddp"][1])  # each its own batch
    assert not torch.allclose(losses["cpu-ddp"][:, 0], losses["cpu-ddp"][:, -1])  # it trains
    torch.testing.assert_close(losses["cpu-fsdp2"], losses["cpu-ddp"], **LOSS_TOLERANCE)

    one = tmp_path / "one-process"
    one.mkdir()
    env = dict(LOSS_LOG=str(one / "losses.json"), REPLAY_DIR=str(tmp_path / "cpu-fsdp2"))
    run_finetune_probe(one, "def check(model):\n    pass\n", [], ["--use_cpu"], env)
    halves = rank_losses(one, (0,))[0].T  # (step, rank) -> (rank, step)
    torch.testing.assert_close(halves, losses["cpu-fsdp2"], **LOSS_TOLERANCE)


def _example():
    from conftest import load_script

    return load_script("examples/finetune.py")


def _example_model():
    return _example().tiny_byte_model(seed=0)
