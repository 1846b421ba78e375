"""Sharded training of a Llama with and without the sink token: collectives, step time, memory.

Two CPU ranks (gloo, one thread each) train a randomly initialised LlamaForCausalLM with AdamW,
wrapped by FSDP2 (fully_shard per decoder layer and at the root) or FSDP1 (one
FullyShardedDataParallel per decoder layer, use_orig_params=True), patched with
sinkdlm.hf.add_sink_token before wrapping or not at all. Per training step it counts the parameter
all-gathers (torch.distributed.all_gather_single, which all_gather_into_tensor and _all_gather_base
call, and all_gather, which FSDP1 uses on CPU) and gradient reduce-scatters (reduce_scatter_single,
likewise reduce_scatter_tensor), forward and backward separately; per step, the wall clock, the
training thread's CPU time with its system part, and its page faults, the larger rank's (the two
models live in the same processes and alternate steps; each ratio is the median over steps of a
patched step over the unpatched step just before it, so both see the same load; with fewer cores
than ranks plus gloo's threads the wall clock swings by 10-15% from step to step, the CPU time
less); and the activation memory per rank (the distinct storages autograd saves for backward in one
forward, counted by a saved_tensors_hooks pack hook: what a step holds at its peak besides
parameters (left out: FSDP frees their gathered copies), gradients and optimizer state, which the
sink grows by one hidden_size vector).

Usage: PYTHONPATH=python python3 benchmarks/fsdp_collectives.py [--model tiny|100m] [--steps 15]
Writes benchmarks/results/fsdp_collectives_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from sinkdlm.ops.cpu_paths import cpu_model

RESULTS = Path(__file__).resolve().parent / "results"
# what _step measures, per training step and rank (the larger rank's kept)
STEP_MEASURES = ("step_times_s", "step_cpu_s", "step_sys_s", "step_page_faults")
WORLD = 2
MODELS = {
    # the tests' tiny Llama, 3 layers
    "tiny": dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, seq_len=32, batch=2,
    ),
    # about 100M parameters (GPT-2 small's width and depth, a 16k vocabulary, untied head)
    "100m": dict(
        vocab_size=16384, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=4, head_dim=64, seq_len=128, batch=1,
    ),
}  # fmt: skip
# FSDP2 gathers through all_gather_single; FSDP1 through all_gather_single, or on CPU through the
# list form all_gather; all_gather_into_tensor / _all_gather_base / reduce_scatter_tensor call the
# *_single ones.
COLLECTIVES = {
    "all_gather_single": "all_gather",
    "all_gather": "all_gather",
    "reduce_scatter_single": "reduce_scatter",
}


class Counter:
    """Counts the wrapped collectives by training phase ("forward", "backward", "optimizer")."""

    def __init__(self):
        self.phase = "setup"
        self.counts = {}
        c10d = dist.distributed_c10d
        for name, kind in COLLECTIVES.items():
            original = getattr(c10d, name)

            def counted(*args, _original=original, _kind=kind, **kwargs):
                key = f"{self.phase}/{_kind}"
                self.counts[key] = self.counts.get(key, 0) + 1
                return _original(*args, **kwargs)

            setattr(c10d, name, counted)  # what all_gather_into_tensor & co. call
            setattr(dist, name, counted)  # what FSDP calls


class SavedForBackward:
    """Bytes of the distinct storages autograd saves for backward during a forward, parameters
    left out (their gathered copies are freed by FSDP and gathered again for backward): the
    activation memory a step holds at its peak."""

    def __init__(self, model):
        self.model = model
        self.storages = {}

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        params = {
            getattr(p, "_local_tensor", p).untyped_storage().data_ptr()
            for p in self.model.parameters()
        }
        if storage.data_ptr() not in params:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def nbytes(self):
        return sum(self.storages.values())

    @property
    def mb(self):
        return self.nbytes / 2**20


def _build(model_name, wrapper, patched):
    import transformers
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    import sinkdlm.hf

    settings = dict(MODELS[model_name])
    del settings["seq_len"], settings["batch"]
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**settings, tie_word_embeddings=False)
    ).train()
    if patched:
        sinkdlm.hf.add_sink_token(model)
    parameters = sum(p.numel() for p in model.parameters())
    if wrapper == "fsdp2":
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    else:
        model = FullyShardedDataParallel(
            model,
            auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
            use_orig_params=True,
            device_id=torch.device("cpu"),
        )
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4), parameters


def _step(model, optimizer, ids, targets, counter, saved=None):
    """One training step; its collectives go to ``counter``; returns the seconds it took, wall
    clock and this thread's CPU time (the model's compute and FSDP's copies, without the waits
    for collectives, which gloo's own threads run), the system part of that CPU time and the
    thread's page faults (memory the allocator handed back to the kernel and touches again)."""
    counter.counts = {}
    dist.barrier()
    start, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_THREAD)
    counter.phase = "forward"
    hooks = (saved.pack, lambda t: t) if saved is not None else None
    with torch.autograd.graph.saved_tensors_hooks(*hooks) if hooks else _nothing():
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    counter.phase = "backward"
    loss.backward()
    counter.phase = "optimizer"
    optimizer.step()
    optimizer.zero_grad()
    elapsed, end = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_THREAD)
    counter.phase = "setup"
    return dict(
        step_times_s=elapsed,
        step_cpu_s=end.ru_utime + end.ru_stime - usage.ru_utime - usage.ru_stime,
        step_sys_s=end.ru_stime - usage.ru_stime,
        step_page_faults=end.ru_minflt + end.ru_majflt - usage.ru_minflt - usage.ru_majflt,
    )


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _rank(rank, rendezvous, model_name, wrapper, steps, out_path):
    """Both models (without and with the sink) on this rank, their steps alternating so that
    both see the same load on the machine."""
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    counter = Counter()
    settings = MODELS[model_name]
    gen = torch.Generator().manual_seed(rank)
    shape = (settings["batch"], settings["seq_len"])
    ids = torch.randint(0, settings["vocab_size"], shape, generator=gen)
    targets = torch.randint(0, settings["vocab_size"], shape, generator=gen)
    runs = {}
    for patched in (False, True):
        model, optimizer, parameters = _build(model_name, wrapper, patched)
        saved = SavedForBackward(model)
        _step(model, optimizer, ids, targets, counter, saved)  # warm-up: lazy init, allocations
        runs[patched] = dict(
            model=model, optimizer=optimizer, times=[], counts=[], parameters=parameters,
            saved_for_backward_mb=saved.mb,
        )  # fmt: skip
    for run in runs.values():  # a second, alternating warm-up: the first timed pair ran slow
        _step(run["model"], run["optimizer"], ids, targets, counter)
    for _ in range(steps):
        for run in runs.values():
            run["times"].append(_step(run["model"], run["optimizer"], ids, targets, counter))
            run["counts"].append(dict(counter.counts))
    result = {}
    for patched, run in runs.items():
        assert all(counts == run["counts"][0] for counts in run["counts"]), run["counts"]
        result[str(patched)] = dict(
            counts=run["counts"][0],
            **{key: [step[key] for step in run["times"]] for key in STEP_MEASURES},
            saved_for_backward_mb=run["saved_for_backward_mb"],
            parameters=run["parameters"],
        )
    Path(out_path.format(rank=rank)).write_text(json.dumps(result))
    runs.clear()
    dist.barrier()
    dist.destroy_process_group()


def measure(model_name, wrapper, steps):
    """{patched: counts, per-step wall and CPU times (the slower rank's), their medians,
    saved-for-backward MB (the larger rank's)}, and the step-time ratios, wall and CPU: the
    median over steps of patched / unpatched, each patched step against the unpatched step just
    before it, so a slow stretch of the shared machine hits both sides of a pair instead of one
    model's median."""
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "rank{rank}.json")
        # A file rendezvous: no TCP port to pick that another process could take meanwhile.
        rendezvous = (Path(tmp) / "rendezvous").as_uri()
        args = (rendezvous, model_name, wrapper, steps, out_path)
        mp.spawn(_rank, args=args, nprocs=WORLD, join=True)
        ranks = [json.loads(Path(out_path.format(rank=r)).read_text()) for r in range(WORLD)]
    runs = {}
    for patched in (False, True):
        per_rank = [r[str(patched)] for r in ranks]
        assert all(r["counts"] == per_rank[0]["counts"] for r in per_rank)
        runs[patched] = dict(counts=per_rank[0]["counts"])
        for key in STEP_MEASURES:
            runs[patched][key] = [max(s) for s in zip(*(r[key] for r in per_rank), strict=True)]
        runs[patched].update(
            step_s=statistics.median(runs[patched]["step_times_s"]),
            step_cpu_s_median=statistics.median(runs[patched]["step_cpu_s"]),
            step_sys_s_median=statistics.median(runs[patched]["step_sys_s"]),
            step_page_faults_median=statistics.median(runs[patched]["step_page_faults"]),
            saved_for_backward_mb=max(r["saved_for_backward_mb"] for r in per_rank),
            parameters=per_rank[0]["parameters"],
        )
    ratios = {}
    for key in ("step_times_s", "step_cpu_s"):
        pairs = zip(runs[True][key], runs[False][key], strict=True)
        ratios[key] = statistics.median(sink / base for sink, base in pairs)
    return runs, ratios["step_times_s"], ratios["step_cpu_s"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--steps", type=int, default=15, help="timed steps after two warm-ups")
    parser.add_argument("--wrappers", nargs="+", default=["fsdp2", "fsdp1"])
    parser.add_argument("--out", type=Path, help="JSON path (default: by model, in results/)")
    args = parser.parse_args()
    rows = []
    for wrapper in args.wrappers:
        runs, step_time_ratio, step_cpu_ratio = measure(args.model, wrapper, args.steps)
        for patched, run in runs.items():
            rows.append(dict(wrapper=wrapper, sink=patched, **run))
        base, sink = runs[False], runs[True]
        rows[-1]["step_time_ratio"] = step_time_ratio
        rows[-1]["step_cpu_ratio"] = step_cpu_ratio
        rows[-1]["saved_ratio"] = sink["saved_for_backward_mb"] / base["saved_for_backward_mb"]
    kinds = dict.fromkeys(COLLECTIVES.values())
    phases = [f"{p}/{k}" for p in ("forward", "backward") for k in kinds]
    header = ["wrapper", "sink", *phases, "step ms", "CPU ms", "sys ms", "faults", "saved MB"]
    header += ["time ratio", "CPU ratio", "saved ratio"]
    print(" | ".join(header))
    for row in rows:
        cells = [row["wrapper"], "yes" if row["sink"] else "no"]
        cells += [str(row["counts"].get(p, 0)) for p in phases]
        times = ("step_s", "step_cpu_s_median", "step_sys_s_median")
        cells += [f"{row[k] * 1e3:.1f}" for k in times]
        cells += [f"{row['step_page_faults_median']:.0f}"]
        cells += [f"{row['saved_for_backward_mb']:.3f}"]
        ratios = ("step_time_ratio", "step_cpu_ratio", "saved_ratio")
        cells += [f"{row[k]:.3f}" if k in row else "" for k in ratios]
        print(" | ".join(cells))
    settings = dict(MODELS[args.model])
    info = dict(
        model=args.model,
        settings=settings,
        world_size=WORLD,
        backend="gloo",
        threads_per_rank=1,
        timed_steps=args.steps,
        cpu=cpu_model(),
        cores=os.cpu_count(),
        torch=torch.__version__,
        code_path="sinkdlm.hf native backend, CPU sink_attention kernel",
        memory="bytes of the distinct storages saved for backward in one forward, per rank, max",
        glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),  # malloc's thresholds, if set
    )
    RESULTS.mkdir(exist_ok=True)
    out = args.out or RESULTS / f"fsdp_collectives_{args.model}.json"
    out.write_text(json.dumps(dict(info=info, rows=rows), indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
