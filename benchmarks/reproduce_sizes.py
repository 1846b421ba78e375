"""How `sinkdlm reproduce` chose its default size: model sizes trained for the same wall time.

The issue asks for the largest model and the most tokens that reach clearly below the corpus's
unigram entropy within the 60-minute default run. At a fixed time per run, a larger model sees
fewer tokens; this sweep measures the trade directly. Each size (layers x d_model, 4 heads, 2 KV
heads, the demo's vocabulary, sequence length, batch and learning rate) is timed over a few
training steps, then trained from scratch (the baseline variant, one seed) for as many steps as
fit in the budget, and scored by the validation bound on the demo's validation masks. The budget
defaults to the default size's 1500 steps at its measured step time, so the default is one of the
points. The corpus's unigram entropy (of the training split's token frequencies) is the line
to get below.

    python3 benchmarks/reproduce_sizes.py            # writes docs/reproduce/sizes.{json,png}
    python3 benchmarks/reproduce_sizes.py --sizes 4x96 4x128 --budget-seconds 60
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from sinkdlm import data as text_data
from sinkdlm import demo
from sinkdlm.models import evaluate_masked_diffusion
from sinkdlm.reproduce import _machine

OUT = Path(__file__).resolve().parents[1] / "docs" / "reproduce"
DEFAULT_SIZE = (4, 128)  # sinkdlm reproduce's --layers / --d-model defaults


def unigram_entropy(train: torch.Tensor) -> float:
    """Entropy in nats/token of the token frequencies of ``train`` (N, L) int64."""
    counts = torch.bincount(train.flatten()).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def build(args, data, layers: int, d_model: int):
    """The demo's model of ``args.variant`` at this size (sinkdlm.demo.build_variant)."""
    sized = copy.copy(args)
    sized.layers, sized.d_model = layers, d_model
    return demo.build_variant(args.variant, data, sized)


def by_size(rows):
    """(parameters, layers, d_model, that size's runs) per size, smallest first."""
    sizes = sorted({(r["parameters"], r["layers"], r["d_model"]) for r in rows})
    for params, layers, d_model in sizes:
        runs = [r for r in rows if (r["layers"], r["d_model"]) == (layers, d_model)]
        yield params, layers, d_model, runs


def step_seconds(args, data, layers: int, d_model: int, steps: int = 20, warmup: int = 5) -> float:
    """Seconds per training step of a throwaway model of this size (after ``warmup`` steps)."""
    run = copy.copy(args)
    model = build(args, data, layers, d_model)
    run.train_steps = warmup
    demo.train_model(model, data.train, run, desc=f"warm-up {layers}x{d_model}")
    run.train_steps = steps
    start = time.perf_counter()
    demo.train_model(model, data.train, run, desc=f"timing {layers}x{d_model}")
    return (time.perf_counter() - start) / steps


def run_size(args, data, layers: int, d_model: int, budget: float) -> dict:
    seconds = step_seconds(args, data, layers, d_model)
    run = copy.copy(args)
    run.train_steps = max(1, int(budget / seconds))
    model = build(args, data, layers, d_model)
    start = time.perf_counter()
    losses = demo.train_model(model, data.train, run, desc=f"train {layers}x{d_model}")
    train_seconds = time.perf_counter() - start
    val = data.val[: args.val_batches * args.batch_size].split(args.batch_size)
    metrics = evaluate_masked_diffusion(
        model, val, mask_id=data.mask_id, seed=args.seed + 3, device=args.device
    )
    params = sum(p.numel() for p in model.parameters())
    embedding = model.embed.weight.numel() + model.lm_head.weight.numel()
    return dict(
        layers=layers,
        d_model=d_model,
        parameters=params,
        non_embedding_parameters=params - embedding,
        step_seconds=seconds,
        train_steps=run.train_steps,
        train_tokens=run.train_steps * args.batch_size * args.seq_len,
        train_seconds=train_seconds,
        train_loss_final=sum(losses[-20:]) / len(losses[-20:]),
        val_bound=metrics["loss"],
        val_masked_accuracy=metrics["accuracy"],
    )


def plot(result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.plot(
        [r["parameters"] / 1e6 for r in rows],
        [r["val_bound"] for r in rows],
        "o",
        ms=4,
        color="C0",
        alpha=0.5,
        label="one seed",
    )
    params, means = [], []
    for size_params, layers, d_model, runs in by_size(rows):
        params.append(size_params / 1e6)
        means.append(sum(r["val_bound"] for r in runs) / len(runs))
        ax.annotate(
            f"{layers}x{d_model}, {runs[0]['train_tokens'] / 1e6:.1f}M tokens",
            (params[-1], means[-1]),
            fontsize=7,
            textcoords="offset points",
            xytext=(6, -3),
        )
    ax.plot(params, means, "-", color="C0", lw=1, label="mean over seeds")
    ax.axhline(result["unigram_entropy"], color="gray", ls="--", lw=1, label="unigram entropy")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("validation bound (nats/token)")
    ax.set_title(
        f"same wall time per run ({result['budget_seconds']:.0f} s of training), "
        f"{result['machine']['cpu']}",
        fontsize=8,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    demo.add_arguments(ap)  # the demo's sizes and training flags, reproduce's defaults below
    ap.set_defaults(variants="baseline", train_steps=1500)
    ap.add_argument("--variant", default="baseline")
    ap.add_argument(
        "--sizes", nargs="+", default=["4x64", "4x96", "4x128", "4x192", "4x256", "8x128"]
    )
    ap.add_argument("--seeds", type=int, default=1, help="seeds per size: --seed, --seed+1, ...")
    ap.add_argument(
        "--budget-seconds",
        type=float,
        default=None,
        help="training seconds per run (default: the --json file's, else the 4x128 default's "
        "--train-steps at its measured step time)",
    )
    ap.add_argument(
        "--json",
        type=Path,
        default=OUT / "sizes.json",
        help="results; runs already in it (same size and seed) are kept, not run again",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = text_data.load_text_data(seq_len=args.seq_len, vocab_size=args.vocab_size)
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes]
    previous = json.loads(args.json.read_text()) if args.json.is_file() else None
    budget = args.budget_seconds
    if budget is None and previous:
        budget = previous["budget_seconds"]
    if budget is None:
        budget = args.train_steps * step_seconds(args, data, *DEFAULT_SIZE)
    if previous and abs(previous["budget_seconds"] - budget) > 1e-6:
        raise SystemExit(f"{args.json} holds runs of a {previous['budget_seconds']:.0f} s budget")
    rows = previous["rows"] if previous else []
    done = {(r["layers"], r["d_model"], r["seed"]) for r in rows}
    todo = [
        (layers, d_model, seed)
        for seed in range(args.seed, args.seed + args.seeds)
        for layers, d_model in sizes
        if (layers, d_model, seed) not in done
    ]
    for layers, d_model, seed in tqdm(todo, desc="runs", unit="run"):
        run = copy.copy(args)
        run.seed = seed
        rows.append(dict(seed=seed, **run_size(run, data, layers, d_model, budget)))
        r = rows[-1]
        print(
            f"{layers}x{d_model} seed {seed}: {r['parameters'] / 1e6:.2f}M params, "
            f"{r['train_steps']} steps ({r['step_seconds'] * 1e3:.0f} ms each), "
            f"val bound {r['val_bound']:.3f}",
            flush=True,
        )
    rows.sort(key=lambda r: (r["parameters"], r["layers"], r["seed"]))
    result = dict(
        machine=_machine(),
        budget_seconds=budget,
        unigram_entropy=unigram_entropy(data.train),
        settings={k: v for k, v in vars(args).items() if k not in ("json", "seed", "seeds")},
        rows=rows,
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, default=str))
    plot(result, args.json.with_suffix(".png"))
    print(f"\nunigram entropy {result['unigram_entropy']:.3f} nats/token; budget {budget:.0f} s")
    print(table(rows))


def table(rows) -> str:
    """Markdown: one line per size, the val bound of each seed and their mean."""
    lines = [
        "| layers x d | params | steps per seed | tokens (mean) | step ms | val bound per seed "
        "| mean |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for params, layers, d_model, runs in by_size(rows):
        bounds = [r["val_bound"] for r in runs]
        lines.append(
            f"| {layers}x{d_model} | {params / 1e6:.2f}M | "
            f"{', '.join(str(r['train_steps']) for r in runs)} | "
            f"{sum(r['train_tokens'] for r in runs) / len(runs) / 1e6:.2f}M | "
            f"{sum(r['step_seconds'] for r in runs) / len(runs) * 1e3:.0f} | "
            f"{', '.join(f'{b:.3f}' for b in bounds)} | {sum(bounds) / len(bounds):.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
