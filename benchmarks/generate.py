"""sinkdlm.generate: no cache vs Fast-dLLM's prefix and dual block caches, with and without the
sliced LM head, and threshold decoding with a small trained model.

Speed: a Llama-shaped transformers model with random weights and sinkdlm's sink token
(``sinkdlm.hf.add_sink_token``: attention through sinkdlm's CPU kernel, the cache through
``sinkdlm.hf.block_cache.BlockCache``), LLaDA's schedule with steps = gen_length (one token per
step), block 32, float32, prompts of 64 tokens (--prompt-lengths). Each configuration runs
``sinkdlm.generate`` whole, ``--repeats`` times (the configurations interleaved), and reports the
best run's generated tokens per second (wall clock), the ratio to no cache (same head) by wall
clock and by the process's CPU time (on a machine shared with other jobs the CPU time of a 1-thread
run is the steadier measure), and the time spent outside the model's forwards as a share of the
time inside them (the forwards timed by a thin wrapper around the model's block forward), and
the MAC ratio: no cache's multiply-adds over the row's (``generate_macs``, checked against
torch's FLOP counter): what "vs no cache" would be if every multiply-add took the same time
(they do not: a cached step's smaller GEMMs run slower per multiply-add, so most rows land a
little under it). "full head" computes every position's logits, as generate did before the head
was sliced (the wrapper asks for all and keeps the block's).

In dual mode a cached step feeds only the block, so there the "full head" is the block's
positions too: it differs from the sliced head only at the refresh forward of each block (all T
positions vs the block's), one forward in block_length.

Threshold: a model that predicts something. A small DiffusionLM with one sink token, the demo's
shape (d_model 128, 4 layers, 4 heads), is trained for 800 steps (cached on disk after the first
run) on the demo corpus as a copy task: passages of ``--copy-length`` (32) tokens followed by the
same passage. Held-out validation passages are then given as prompts and the copy is generated
(blocks of 16) with Fast-dLLM's threshold rule at 0.9, 0.7 and 0.5, no cache vs prefix vs dual:
tokens/s, the mean tokens filled per model call (one call fills every row of the batch), the
share of generated tokens equal to the passage (copy accuracy) and to the uncached generation
(agreement). On plain continuation of demo text a model this small is almost never 90% sure
(about one token per step at 0.9), which would leave nothing to measure.

Presets: ``small`` (default, minutes on 2 CPU cores: a ~12M-parameter model, batch 1, gen 256 and
512) and ``issue`` (issue 14's matrix: ~125M parameters, batch 1 and 4, gen 256 and 512; hours on
2 CPU cores in full, about half an hour with ``--heads sliced --no-cache-calls 64``). With
``--no-cache-calls N`` the uncached runs are timed over their first N model calls: each is the
same full forward, so the rate is the whole run's (the cached runs always run whole, since their
cost changes from block to block). ``--prompt-lengths`` sweeps the prompt: a prefix cache saves
the prompt's share of every step, so its gain grows with the prompt.

Usage: PYTHONPATH=python python benchmarks/generate.py [--preset small|issue] [--threads N]
[--device cpu|cuda] [--prompt-lengths 64 256] [--heads full sliced] [--caches prefix dual]
[--batches 1 4] [--gen-lengths 256 512] [--no-cache-calls N] [--merge] [--out PATH].
``--merge`` adds this run's rows to the JSON's (same machine and model), so a matrix too long for
one sitting can be timed in parts.
Writes benchmarks/results/generate_<cpu|cuda>[_issue].json (or --out) and a PNG beside it and
prints the table (the CUDA path synchronizes around each timed forward; it has not run yet).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import sinkdlm
import sinkdlm.hf
from sinkdlm import protocol
from sinkdlm.ops.cpu_paths import cpu_model

RESULTS = Path(__file__).resolve().parent / "results"
PRESETS = {
    "small": dict(
        hidden=384,
        layers=4,
        heads=6,
        kv_heads=2,
        ffn=1024,
        vocab=8192,
        batches=[1],
        gen_lengths=[256, 512],
    ),
    "issue": dict(
        hidden=768,
        layers=12,
        heads=12,
        kv_heads=4,
        ffn=2048,
        vocab=32000,
        batches=[1, 4],
        gen_lengths=[256, 512],
    ),
}
MODES = [None, "prefix", "dual"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StopTiming(Exception):
    """Raised by Timed after its ``max_calls``-th model call."""


class Timed:
    """The model's block forward, timed; ``full_head`` computes every query position's logits
    and keeps the step's afterwards (the head as it was before slicing). With ``max_calls``
    the generation stops (StopTiming) after that many model calls."""

    def __init__(self, model, full_head, max_calls=None):
        self.forward, cacheable = protocol.block_forward(model)
        assert cacheable, f"{type(model).__name__} has no block forward"
        self.full_head = full_head
        self.max_calls = max_calls
        self.seconds = 0.0
        self.calls = 0

    def block_forward(self, tokens, attention_mask, *, cache, keep):
        if self.calls == self.max_calls:
            raise StopTiming
        synchronize(tokens.device)
        start = time.perf_counter()
        if self.full_head:
            every = torch.arange(tokens.shape[1], device=tokens.device)
            logits = self.forward(tokens, attention_mask, cache=cache, keep=every)[:, keep]
        else:
            logits = self.forward(tokens, attention_mask, cache=cache, keep=keep)
        synchronize(tokens.device)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return logits


def timed_generate(model, prompts, *, full_head, max_calls=None, **kwargs):
    """(output or None if stopped at ``max_calls``, wall seconds in generate, CPU seconds in
    generate, wall seconds in the model, model calls)."""
    timed = Timed(model, full_head, max_calls)
    with protocol.inference_cache(model):  # the sink pass once per call, as for the model
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            out = sinkdlm.generate(timed, prompts, **kwargs)
            synchronize(out.device)
        except StopTiming:
            out = None
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return out, seconds, cpu_seconds, timed.seconds, timed.calls


def llama(preset, seed=0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=preset["vocab"],
        hidden_size=preset["hidden"],
        intermediate_size=preset["ffn"],
        num_hidden_layers=preset["layers"],
        num_attention_heads=preset["heads"],
        num_key_value_heads=preset["kv_heads"],
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    model = transformers.LlamaForCausalLM(config).eval()
    return sinkdlm.hf.add_sink_token(model)


def speed(args, preset) -> list[dict]:
    model = llama(preset).to(args.device)
    params = sum(p.numel() for p in model.parameters())
    vocab = preset["vocab"]
    # The uncached run is every ratio's base, so it always runs.
    modes = [mode for mode in MODES if mode is None or mode in args.caches]
    configs = [
        (batch, prompt_length, gen_length, full_head, mode)
        for batch in preset["batches"]
        for prompt_length in args.prompt_lengths
        for gen_length in preset["gen_lengths"]
        for full_head in [head == "full" for head in args.lm_heads]
        for mode in modes
    ]
    # Per configuration: the best run's generated tokens per second by wall clock, and per CPU
    # second. A step fills one token per row (steps = gen_length), so tokens = batch * calls.
    best, best_cpu = {}, {}
    for repeat in range(args.repeats):
        for batch, prompt_length, gen_length, full_head, mode in configs:
            g = torch.Generator().manual_seed(1)
            prompts = torch.randint(0, vocab - 1, (batch, prompt_length), generator=g)
            prompts = prompts.to(args.device)
            # Every uncached step is the same full forward (steps = gen_length: one token per
            # row per step), so its rate over the first calls is the whole generation's.
            max_calls = args.no_cache_calls if mode is None else None
            out, seconds, cpu_seconds, inside, calls = timed_generate(
                model,
                prompts,
                full_head=full_head,
                max_calls=max_calls,
                gen_length=gen_length,
                steps=gen_length,
                block_length=args.block_length,
                mask_id=vocab - 1,
                cache=mode,
            )
            assert out is None or calls == gen_length, (calls, gen_length)
            key = (batch, prompt_length, gen_length, full_head, mode)
            tokens = batch * calls
            if key not in best or tokens / seconds > best[key]["rate"]:
                best[key] = dict(rate=tokens / seconds, seconds=seconds, inside=inside, calls=calls)
            best_cpu[key] = max(tokens / cpu_seconds, best_cpu.get(key, 0.0))
            print(
                f"run {repeat + 1}: batch {batch} prompt {prompt_length} gen {gen_length} "
                f"{mode or 'none':>6} {'full' if full_head else 'sliced':>6} head, {calls} calls: "
                f"{tokens / seconds:7.1f} tok/s (CPU time {cpu_seconds:.1f} s)",
                flush=True,
            )
    rows = []
    for batch, prompt_length, gen_length, full_head, mode in configs:
        key = (batch, prompt_length, gen_length, full_head, mode)
        base_key = (batch, prompt_length, gen_length, full_head, None)
        run, base = best[key], best[base_key]
        rows.append(
            dict(
                batch=batch,
                prompt_length=prompt_length,
                gen_length=gen_length,
                cache=mode or "none",
                head="full" if full_head else "sliced",
                seconds=run["seconds"],
                tokens_per_s=run["rate"],
                tokens_per_cpu_s=best_cpu[key],
                vs_no_cache=run["rate"] / base["rate"],
                vs_no_cache_cpu_time=best_cpu[key] / best_cpu[base_key],
                model_calls=run["calls"],
                timed_calls_only=run["calls"] < gen_length,
                outside_model_share=(run["seconds"] - run["inside"]) / run["inside"],
                params=params,
                repeats=args.repeats,
                no_cache_calls=args.no_cache_calls,
            )
        )
    return rows


def copy_chunks(chunks: torch.Tensor, half: int) -> torch.Tensor:
    """(N, 2 half): each chunk's first ``half`` tokens twice, so the second copy is predictable."""
    first = chunks[:, :half]
    return torch.cat([first, first], dim=1)


def train_copy_task(model, train, args, batch_size=32, lr=3e-3):
    """AdamW on the masked diffusion loss of the copies only (the first half is a prompt: never
    masked, never scored), warm-up then a linear decay to lr / 10."""
    from sinkdlm.train import masked_diffusion_loss

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    batches, masks = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    prompt = torch.zeros(batch_size, train.shape[1], dtype=torch.bool)
    prompt[:, : train.shape[1] // 2] = True
    for step in range(args.train_steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50) * (1 - 0.9 * step / args.train_steps)
        batch = train[torch.randint(0, train.shape[0], (batch_size,), generator=batches)]
        loss = masked_diffusion_loss(
            model, batch, mask_id=model.config.mask_id, prompt_mask=prompt, generator=masks
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 99:
            print(
                f"training the threshold model: step {step + 1}, loss {loss.item():.3f}", flush=True
            )


def trained_model(args):
    """A small one-sink DiffusionLM trained on the demo corpus's copy task, and the corpus."""
    from sinkdlm import data as text_data
    from sinkdlm.models import DiffusionLM, load_model, save_model, variant_config

    text = text_data.load_text_data(seq_len=2 * args.copy_length, vocab_size=1024)
    settings = f"d{args.train_width}-l4-s{args.train_steps}-copysft{args.copy_length}"
    path = text_data.cache_dir() / f"generate-bench-sink1-{settings}.safetensors"
    if path.is_file():
        return load_model(path).eval(), text
    torch.manual_seed(0)
    cfg = variant_config(
        "sink1",
        vocab_size=text.vocab_size,
        mask_id=text.mask_id,
        d_model=args.train_width,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
    )
    model = DiffusionLM(cfg)
    train_copy_task(model, copy_chunks(text.train, args.copy_length), args)
    save_model(model, path)
    return model.eval(), text


def threshold(args) -> list[dict]:
    model, text = trained_model(args)
    model.to(args.device)
    half = args.copy_length
    prompts = text.val[: args.threshold_prompts, :half].to(args.device)  # passages to repeat
    rows = []
    for value in args.thresholds:
        reference = None
        for mode in MODES:
            out, seconds, cpu_seconds, inside, calls = timed_generate(
                model,
                prompts,
                full_head=False,
                gen_length=half,
                steps=half,
                block_length=args.threshold_block_length,
                mask_id=text.mask_id,
                threshold=value,
                cache=mode,
            )
            generated = out[:, half:]
            reference = generated if reference is None else reference
            row = dict(
                cache=mode or "none",
                threshold=value,
                tokens_per_s=generated.numel() / seconds,
                cpu_seconds=cpu_seconds,
                tokens_per_step=half / calls,
                copy_accuracy=(generated == prompts).double().mean().item(),
                agreement_with_no_cache=(generated == reference).double().mean().item(),
                outside_model_share=(seconds - inside) / inside,
                model_calls=calls,
            )
            rows.append(row)
            print(
                f"threshold {value} {row['cache']:>6}: {row['tokens_per_s']:7.1f} tok/s, "
                f"{row['tokens_per_step']:.2f} tokens/step, copy accuracy "
                f"{100 * row['copy_accuracy']:.1f}%, agreement with no cache "
                f"{100 * row['agreement_with_no_cache']:.1f}%",
                flush=True,
            )
    return rows


def _key(row, head=None) -> tuple:
    """A speed row's configuration: (batch, prompt, gen, cache, head)."""
    head = head or row["head"]
    return (row["batch"], row["prompt_length"], row["gen_length"], row["cache"], head)


# What the rows of two runs must share to go in one table (--merge).
MERGE_MUST_MATCH = ("cpu", "device", "threads", "torch")
MERGE_MODEL_SETTINGS = ("hidden", "layers", "kv_heads", "ffn", "vocab", "block_length")


def check_mergeable(previous, result) -> None:
    """SystemExit unless ``previous``'s speed rows were measured as ``result``'s will be."""
    if not previous.get("speed"):
        return
    theirs, ours = previous["speed_settings"], result["settings"]
    differ = [k for k in MERGE_MUST_MATCH if previous.get(k) != result[k]]
    differ += [k for k in MERGE_MODEL_SETTINGS if theirs.get(k) != ours.get(k)]
    if differ:
        raise SystemExit(
            "--merge: the JSON's speed rows were measured with another "
            + ", ".join(f"{k} ({previous.get(k, theirs.get(k))!r} vs "
                        f"{result.get(k, ours.get(k))!r})" for k in differ)
            + "; run without --merge to replace them"
        )  # fmt: skip


def merged_speed_rows(previous, result) -> list[dict]:
    """``result``'s speed rows plus ``previous``'s for the configurations it did not time, in
    table order; each row keeps the repeats and uncached-call cut it was timed with."""
    if not previous.get("speed"):
        return result["speed"]
    if previous["speed"][0]["params"] != result["speed"][0]["params"]:
        raise SystemExit("--merge: the JSON's speed rows are of a model of another size")
    timed = {_key(r) for r in result["speed"]}
    theirs = previous["speed_settings"]
    kept = [
        {"repeats": theirs["repeats"], "no_cache_calls": theirs["no_cache_calls"], **r}
        for r in previous["speed"]
        if _key(r) not in timed
    ]
    caches = [mode or "none" for mode in MODES]

    def order(r):
        head = ("full", "sliced").index(r["head"])
        return (r["batch"], r["prompt_length"], r["gen_length"], head, caches.index(r["cache"]))

    return sorted(kept + result["speed"], key=order)


def generate_macs(settings, prompt_length, gen_length, cache, head, sink=True) -> int:
    """Multiply-adds per row of one generate call with steps = gen_length (one token per step):
    the projections, the MLP and attention (scores and values, the sink's key included) of
    every fed token in every layer, and the LM head at the positions whose logits are computed.
    Their ratios are what a cache mode would gain if every multiply-add took the same time.
    ``sink``: the model has the sink token (one more key per attention row)."""
    hidden, layers, block = settings["hidden"], settings["layers"], settings["block_length"]
    kv_width = settings["kv_heads"] * hidden // settings["heads"]
    per_token = 2 * hidden * hidden + 2 * hidden * kv_width + 3 * hidden * settings["ffn"]
    total = prompt_length + gen_length

    def forward(queries, kept):
        return (
            layers * queries * (per_token + 2 * hidden * (total + sink))
            + kept * hidden * settings["vocab"]
        )

    def kept(queries):
        return queries if head == "full" else block

    if cache == "none":
        return gen_length * forward(total, kept(total))
    macs = 0
    for start in range(0, gen_length, block):
        # the block's first step is the refreshing forward over the whole sequence
        queries = gen_length - start if cache == "prefix" else block
        macs += forward(total, kept(total)) + (block - 1) * forward(queries, kept(queries))
    return macs


def mac_ratio(row, settings) -> float:
    """No cache's multiply-adds over the row's (see generate_macs): its "vs no cache" if time
    followed the arithmetic."""
    config = (settings, row["prompt_length"], row["gen_length"])
    return generate_macs(*config, "none", row["head"]) / generate_macs(
        *config, row["cache"], row["head"]
    )


def table(result) -> str:
    cpu_rate = {_key(r): r["tokens_per_cpu_s"] for r in result["speed"]}
    settings = result["speed_settings"]  # the model the speed rows were timed on
    lines = [
        "| batch | prompt | gen | cache | head | tokens/s | tokens/CPU s | vs no cache | "
        "(CPU time) | MAC ratio | sliced vs full (CPU time) | outside model |",
        "|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["speed"]:
        head = r["head"]
        if head == "full" and r["cache"] == "dual":
            head = "full (= block but at refresh)"
        gain = ""
        if r["head"] == "sliced":
            full = cpu_rate.get(_key(r, head="full"))
            gain = f"{r['tokens_per_cpu_s'] / full:.2f}x" if full else ""
        lines.append(
            f"| {r['batch']} | {r['prompt_length']} | {r['gen_length']} | {r['cache']} | {head} | "
            f"{r['tokens_per_s']:.1f} | {r['tokens_per_cpu_s']:.1f} | "
            f"{r['vs_no_cache']:.2f}x | "
            f"{r['vs_no_cache_cpu_time']:.2f}x | {mac_ratio(r, settings):.2f}x | {gain} | "
            f"{100 * r['outside_model_share']:.1f}% |"
        )
    lines += [
        "",
        "| threshold | cache | tokens/s | tokens/step | copy accuracy | agreement with no cache |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in result["threshold"]:
        lines.append(
            f"| {r['threshold']} | {r['cache']} | {r['tokens_per_s']:.1f} | "
            f"{r['tokens_per_step']:.2f} | {100 * r['copy_accuracy']:.1f}% | "
            f"{100 * r['agreement_with_no_cache']:.1f}% |"
        )
    return "\n".join(lines)


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["batch"], r["prompt_length"], r["gen_length"]) for r in result["speed"]})
    fig, ax = plt.subplots(figsize=(2.2 + 2.2 * len(groups), 3.6))
    width = 0.13
    heads = [h for h in ("full", "sliced") if any(r["head"] == h for r in result["speed"])]
    bars = [(mode or "none", head) for head in heads for mode in MODES]
    rate = {_key(r): r["tokens_per_cpu_s"] for r in result["speed"]}
    for i, (cache, head) in enumerate(bars):
        values = [rate.get((*g, cache, head), float("nan")) for g in groups]  # nan: not timed
        positions = [j + (i - (len(bars) - 1) / 2) * width for j in range(len(groups))]
        ax.bar(
            positions,
            values,
            width,
            label=f"{cache}, {head} head",
            color=f"C{[mode or 'none' for mode in MODES].index(cache)}",
            hatch="" if head == "sliced" else "//",
            edgecolor="white",
        )
    ax.set_xticks(
        range(len(groups)), [f"batch {b}, prompt {p}\ngen {g}" for b, p, g in groups], fontsize=8
    )
    # CPU time, not wall clock: on a machine shared with other jobs it is the steadier measure.
    ax.set_ylabel("generated tokens / CPU second")
    where = result["cpu"] if result["device"] == "cpu" else result["device"]
    ax.set_title(f"sinkdlm.generate, {where} ({result['threads']} threads)", fontsize=9)
    ax.margins(y=0.3)  # room for the legend above the bars
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="small")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda (the speed part and generation)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs per configuration (best)")
    parser.add_argument(
        "--prompt-lengths",
        type=int,
        nargs="+",
        default=[64],
        help="prompt lengths (a prefix cache gains more with a longer prompt)",
    )
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.7, 0.5])
    parser.add_argument("--threshold-prompts", type=int, default=8)
    parser.add_argument("--threshold-block-length", type=int, default=16)
    # The demo's model shape (sinkdlm demo defaults), trained on passages of copy_length tokens
    # followed by the same passage.
    parser.add_argument("--copy-length", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=800)
    parser.add_argument("--train-width", type=int, default=128)
    parser.add_argument(
        "--heads",
        dest="lm_heads",
        nargs="+",
        choices=["full", "sliced"],
        default=["full", "sliced"],
        help="LM heads to time (full: every fed position's logits, as before slicing)",
    )
    parser.add_argument(
        "--caches",
        nargs="+",
        choices=["prefix", "dual"],
        default=["prefix", "dual"],
        help="cache modes to time (no cache always runs: it is every ratio's base)",
    )
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default: preset's)")
    parser.add_argument("--gen-lengths", type=int, nargs="+", help="default: the preset's")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the JSON's speed rows for configurations this run does not time (same "
        "machine, torch, threads and model; refused otherwise)",
    )
    parser.add_argument(
        "--no-cache-calls",
        type=int,
        default=None,
        help="time the uncached runs over their first N model calls only (each is the same "
        "full forward, so the rate is the whole run's); cached runs always run whole",
    )
    parser.add_argument(
        "--out",  # a str, not a Path: the settings go into the JSON
        help="JSON path (default: results/generate_<device>[_<preset>].json; the PNG beside it)",
    )
    parser.add_argument("--skip-speed", action="store_true", help="only the threshold part")
    parser.add_argument("--skip-threshold", action="store_true", help="only the speed part")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = dict(PRESETS[args.preset])
    preset["batches"] = args.batches or preset["batches"]
    preset["gen_lengths"] = args.gen_lengths or preset["gen_lengths"]
    device = torch.device(args.device)
    result = dict(
        cpu=cpu_model(),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        preset=args.preset,
        settings={**vars(args), **preset},
        code_path=f"sinkdlm.hf native backend: sinkdlm {device.type} sink attention, "
        f"sinkdlm.hf.block_cache.BlockCache, sinkdlm.remask_step {device.type} kernel; float32",
    )
    # The small preset is the README's main table; other presets get their own files.
    suffix = "" if args.preset == "small" else f"_{args.preset}"
    path = Path(args.out) if args.out else RESULTS / f"generate_{device.type}{suffix}.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    if args.merge and not args.skip_speed:
        check_mergeable(previous, result)  # before the run, not after it
    parts = {"speed": lambda: speed(args, preset), "threshold": lambda: threshold(args)}
    skipped = {"speed": args.skip_speed, "threshold": args.skip_threshold}
    for part, run in parts.items():
        if not skipped[part]:
            result[part] = run()
            result[f"{part}_settings"] = dict(result["settings"], threads=result["threads"])
    if args.merge and not args.skip_speed:
        result["speed"] = merged_speed_rows(previous, result)
    # A skipped part keeps its rows (and their settings) from the JSON as it is now, if any.
    for part in parts:
        if skipped[part]:
            result[part] = previous.get(part, [])
            result[f"{part}_settings"] = previous.get(f"{part}_settings", {})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    if result["speed"]:
        plot(result, path.with_suffix(".png"))
    print(table(result))


if __name__ == "__main__":
    main()
