"""``sinkdlm demo``: train a baseline and a one-sink masked-diffusion model on the same data, then
compare their validation bound, masked-token accuracy and attention sinks during generation.

Default settings finish on a 2-core CPU in under 10 minutes; flags scale it up (--device cuda,
--d-model, --layers, --train-steps, --max-train-tokens) and add the other ablations (--variants).
Writes the PNG plots, the safetensors weights and report.json into --out and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import data as text_data
from .analysis import (
    AttentionRecorder,
    moving_sink_stats,
    plot_comparison,
    plot_sink_heatmap,
    plot_value_norms,
)
from .models import VARIANTS, DiffusionLM, evaluate_masked_diffusion, save_model, variant_config

DEFAULT_VARIANTS = "baseline,sink1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line flags of the demo (see ``sinkdlm demo --help``)."""
    a = parser.add_argument
    a("--out", default="sinkdlm-demo", help="output folder for plots, weights and report.json")
    a("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    a(
        "--variants",
        default=DEFAULT_VARIANTS,
        help=f"comma-separated model variants, from: {', '.join(VARIANTS)}",
    )
    a("--seed", type=int, default=0)
    a("--d-model", type=int, default=128)
    a("--layers", type=int, default=4)
    a("--heads", type=int, default=4)
    a("--kv-heads", type=int, default=2)
    a("--seq-len", type=int, default=64)
    a("--vocab-size", type=int, default=1024, help="byte-level BPE vocabulary size")
    a("--batch-size", type=int, default=32)
    a("--train-steps", type=int, default=1500)
    a("--lr", type=float, default=3e-3)
    a("--max-train-tokens", type=int, default=None, help="truncate the training set")
    a("--val-batches", type=int, default=16, help="validation batches (same masks for all)")
    a("--samples", type=int, default=4, help="sequences generated per model")
    a("--prompt-len", type=int, default=16)
    a("--gen-length", type=int, default=48)
    a("--gen-steps", type=int, default=48)
    a("--sink-method", default="ratio", choices=["ratio", "zscore"])
    a("--sink-epsilon", type=float, default=3.0, help="ratio criterion threshold")
    a("--sink-k", type=float, default=2.0, help="z-score criterion threshold")
    a("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def _lr_at(step, total, peak):
    warmup = max(1, total // 10)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_model(model, train, args, desc):
    """Train on random batches of ``train`` (N,L) with masked_diffusion_loss; the batch order and
    masking draws depend only on the seed, so every variant sees the same data and masks."""
    from .train import masked_diffusion_loss

    device = torch.device(args.device)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    batch_gen = torch.Generator().manual_seed(args.seed)
    mask_gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    losses = []
    bar = tqdm(range(args.train_steps), desc=desc, unit="step", dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(0, train.shape[0], (args.batch_size,), generator=batch_gen)
        batch = train[idx].to(device)
        loss = masked_diffusion_loss(model, batch, mask_id=model.config.mask_id, generator=mask_gen)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, args.train_steps, args.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == args.train_steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    return losses


def _generate(model, prompts, args, mask_id):
    from .generate import generate

    gen = torch.Generator(device=args.device).manual_seed(args.seed + 2)
    return generate(
        model,
        prompts,
        gen_length=args.gen_length,
        steps=args.gen_steps,
        mask_id=mask_id,
        generator=gen,
    )


def build_variant(name, data, args) -> DiffusionLM:
    """A freshly initialised (seeded by ``args.seed``) model of variant ``name`` at the size
    ``args`` gives (--d-model, --layers, --heads, --kv-heads), for ``data``'s vocabulary."""
    torch.manual_seed(args.seed)
    cfg = variant_config(
        name,
        vocab_size=data.vocab_size,
        mask_id=data.mask_id,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        n_kv_heads=args.kv_heads,
    )
    return DiffusionLM(cfg)


def run_variant(name, data, args, out_dir):
    """Train, evaluate, generate with the recorder; return (report dict, SinkTrace, losses, the
    trained model)."""
    model = build_variant(name, data, args)
    t0 = time.perf_counter()
    losses = train_model(model, data.train, args, desc=f"train {name}")
    train_s = time.perf_counter() - t0
    save_model(model, out_dir / f"{name}.safetensors")

    val = data.val[: args.val_batches * args.batch_size].split(args.batch_size)
    metrics = evaluate_masked_diffusion(
        model, val, mask_id=data.mask_id, seed=args.seed + 3, device=args.device
    )
    model.eval()
    prompts = data.val[: args.samples, : args.prompt_len].to(args.device)
    with AttentionRecorder(model) as recorder:
        sequences = _generate(model, prompts, args, data.mask_id)
    trace = recorder.trace()
    stats = moving_sink_stats(
        trace, method=args.sink_method, epsilon=args.sink_epsilon, k=args.sink_k
    )
    samples = [
        {
            "prompt": data.decode(seq[: args.prompt_len]),
            "completion": data.decode(seq[args.prompt_len :]),
        }
        for seq in sequences.cpu()
    ]
    report = {
        "config": model.config.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": train_s,
        "train_loss_final": sum(losses[-20:]) / len(losses[-20:]),
        "val_loss": metrics["loss"],
        "val_masked_accuracy": metrics["accuracy"],
        "val_masked_tokens": metrics["n_masked"],
        "sinks": stats,
        "recorded_steps": trace.num_steps,
        "samples": samples,
    }
    return report, trace, losses, model


TABLE_ROWS = [
    ("val loss (ELBO bound, nats/token)", lambda r: r["val_loss"], "{:.3f}"),
    ("val masked-token accuracy", lambda r: r["val_masked_accuracy"], "{:.3f}"),
    ("train loss (last 20 steps)", lambda r: r["train_loss_final"], "{:.3f}"),
    ("heads with a token sink", lambda r: r["sinks"]["sink_rate"], "{:.3f}"),
    ("dominant sink moves / step", lambda r: r["sinks"]["move_rate"], "{:.3f}"),
    ("dominant sink position std", lambda r: r["sinks"]["position_spread"], "{:.2f}"),
    ("distinct sink positions", lambda r: r["sinks"]["distinct_positions"], "{:.2f}"),
    ("top token key mass", lambda r: r["sinks"]["top_key_mass"], "{:.3f}"),
    ("sink-token share of attention", lambda r: r["sinks"]["sink_token_share"], "{:.3f}"),
    ("value norm: token sinks", lambda r: r["sinks"]["value_norm_sink"], "{:.2f}"),
    ("value norm: other tokens", lambda r: r["sinks"]["value_norm_other"], "{:.2f}"),
    ("value norm: sink token", lambda r: r["sinks"]["value_norm_sink_token"], "{:.2f}"),
    ("train time (s)", lambda r: r["train_seconds"], "{:.0f}"),
]


def format_table(reports: dict) -> str:
    """Side-by-side table of the variants' metrics (nan shown as '-')."""
    names = list(reports)
    width = max(12, *(len(n) + 2 for n in names))
    lines = [f"{'metric':<36}" + "".join(f"{n:>{width}}" for n in names)]
    lines.append("-" * len(lines[0]))
    for label, get, fmt in TABLE_ROWS:
        cells = []
        for n in names:
            v = get(reports[n])
            cells.append(
                "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)
            )
        lines.append(f"{label:<36}" + "".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


def _plot_training(curves: dict, path):
    from .analysis.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, losses in curves.items():
        t = torch.tensor(losses)
        w = max(1, len(losses) // 25)
        smooth = t.unfold(0, w, 1).mean(-1) if len(losses) >= w else t
        ax.plot(range(w - 1, w - 1 + len(smooth)), smooth.numpy(), label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel("masked-diffusion loss (smoothed)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def run_demo(args) -> dict:
    """Run the demo for parsed ``args``; returns the report (also written to out/report.json)."""
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        data = text_data.load_text_data(
            seq_len=args.seq_len, vocab_size=args.vocab_size, max_train_tokens=args.max_train_tokens
        )
    except text_data.CorpusMissingError as err:
        raise SystemExit(str(err)) from err
    print(
        f"data: {data.train.shape[0]} train / {data.val.shape[0]} validation sequences of "
        f"{args.seq_len} tokens, vocabulary {data.vocab_size}"
    )

    reports, traces, curves = {}, {}, {}
    for name in variants:
        reports[name], traces[name], curves[name], _ = run_variant(name, data, args, out_dir)

    crit = dict(method=args.sink_method, epsilon=args.sink_epsilon, k=args.sink_k)
    plots = {}
    for name, trace in traces.items():
        plots[f"{name}_sinks"] = str(
            plot_sink_heatmap(
                trace,
                out_dir / f"{name}_sinks.png",
                title=f"{name}: sink positions per step",
                mask_id=data.mask_id,
                **crit,
            )
        )
        plots[f"{name}_value_norms"] = str(
            plot_value_norms(
                trace, out_dir / f"{name}_value_norms.png", title=f"{name}: value norms", **crit
            )
        )
    plots["comparison"] = str(
        plot_comparison(traces, out_dir / "comparison.png", mask_id=data.mask_id, **crit)
    )
    _plot_training(curves, out_dir / "training_loss.png")
    plots["training_loss"] = str(out_dir / "training_loss.png")

    table = format_table(reports)
    report = {
        "args": vars(args),
        "variants": reports,
        "table": table,
        "plots": plots,
        "wall_seconds": time.perf_counter() - start,
    }
    (out_dir / "report.json").write_text(json.dumps(_json_safe(report), indent=2))

    print("\n" + table + "\n")
    for name, rep in reports.items():
        print(f"samples from {name}:")
        for s in rep["samples"]:
            prompt, completion = (" ".join(t.split()) for t in (s["prompt"], s["completion"]))
            print(f"  [{prompt}] -> {completion}")
    print(
        f"\nwrote {len(plots)} plots, weights and report.json to {out_dir.resolve()} "
        f"({report['wall_seconds']:.0f} s)"
    )
    return report
