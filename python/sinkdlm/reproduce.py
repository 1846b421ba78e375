"""``sinkdlm reproduce``: the sink paper's comparisons as one multi-seed experiment.

Trains every variant (baseline, one sink, and the ablations of sinkdlm.models.VARIANTS) with N
seeds through the demo's training and evaluation code (sinkdlm.demo.run_variant), adds the
downstream-style scores (LAMBADA-like last-word accuracy and a multiple-choice likelihood score on
held-out documents, both by the masked-diffusion likelihood) and the share of tokens outside the
sink set, then reports mean +- a 95% t-interval over seeds per metric and the paired differences
against the baseline (same seed = same data order, masking draws and initial weights' seed).

Resumable: each finished (variant, seed) writes ``runs/<variant>-seed<k>.json`` under --out and is
not run again; a rerun with other settings into the same folder is refused. Writes report.json,
table.md and reproduce.png into --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import data as text_data
from . import demo
from .analysis import detect_sinks
from .models import VARIANTS

# The paper's one-sink claim and its three token-sink ablations (position, count, zero value);
# sink4, sink_logit and gate run with --variants all.
DEFAULT_VARIANTS = "baseline,sink1,sink1_end,sink2,sink1_zero_value"
# Flags that do not change a run's numbers (where it is written, which runs, how many threads).
_NOT_SETTINGS = {"command", "out", "variants", "seeds", "seed", "threads"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``sinkdlm reproduce``: the demo's (sizes, training, generation, sink criterion)
    with this experiment's defaults, plus the seeds and the downstream evaluation."""
    demo.add_arguments(parser)
    parser.set_defaults(out="sinkdlm-reproduce", variants=DEFAULT_VARIANTS, train_steps=1500)
    a = parser.add_argument
    a("--seeds", type=int, default=3, help="seeds per variant: --seed, --seed+1, ...")
    a("--lambada-examples", type=int, default=256, help="held-out documents for last-word acc.")
    a("--choice-examples", type=int, default=256, help="held-out documents for multiple choice")
    a("--choices", type=int, default=4, help="endings per multiple-choice question")
    a("--choice-len", type=int, default=8, help="tokens per multiple-choice ending")
    a("--choice-draws", type=int, default=1, help="masking draws per ending length (ELBO)")
    a("--eval-batch-size", type=int, default=64)


# ---------------------------------------------------------------- statistics


def _t_cdf(x: float, df: int) -> float:
    # Student t CDF for x >= 0 by Simpson's rule on the density (smooth, so 2000 panels suffice).
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    n = 2000
    h = x / n
    total = 0.0
    for i in range(n + 1):
        w = 1 if i in (0, n) else (4 if i % 2 else 2)
        u = i * h
        total += w * math.exp(log_c - (df + 1) / 2 * math.log1p(u * u / df))
    return 0.5 + total * h / 3


def t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t with ``df`` degrees of freedom for p in (0.5, 1), by bisection."""
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


def mean_interval(values, level: float = 0.95) -> dict:
    """Mean and half-width of the two-sided t-interval of finite ``values`` (nan if < 2)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(vals)
    if n == 0:
        return {"mean": math.nan, "half_width": math.nan, "n": 0}
    mean = sum(vals) / n
    if n < 2:
        return {"mean": mean, "half_width": math.nan, "n": n}
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    return {
        "mean": mean,
        "half_width": t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n),
        "n": n,
    }


# ---------------------------------------------------------------- downstream-style evaluation


def _held_out_stream(data):
    """Token ids of each held-out document (+ <|eos|>), in the validation chunks' order."""
    _, val_docs = text_data.split_documents(text_data.load_documents())
    return val_docs, [enc.ids + [data.eos_id] for enc in data.tokenizer.encode_batch(val_docs)]


def lambada_examples(data, seq_len: int, n: int, min_context: int = 16):
    """LAMBADA-like items from held-out documents: the document's last word (letters only) is the
    target, its own text before it (>= ``min_context`` tokens) and the documents before it fill
    a window of ``seq_len`` tokens ending at the document's <|eos|>. Returns (ids (N,L) int64,
    target (N,L) bool); fewer than ``n`` if the held-out set has fewer such documents."""
    docs, streams = _held_out_stream(data)
    enc = data.tokenizer.encode
    rows, targets, history = [], [], []
    for doc, ids in zip(docs, streams, strict=True):
        m = re.search(r"([A-Za-z]{2,})([^A-Za-z]*)$", doc)
        if m and len(history) >= seq_len and len(rows) < n:
            prefix, word, suffix = doc[: m.start(1)], m.group(1), m.group(2)
            whole_word = bool(prefix) and not prefix[-1].isalnum() and prefix[-1] not in "'-"
            # The BPE reads " word" as one piece: keep the space with the word.
            if prefix.endswith(" "):
                prefix, word = prefix[:-1], " " + word
            if whole_word:
                ctx = enc(prefix).ids
                tgt = enc(word).ids
                tail = enc(suffix).ids + [data.eos_id] if suffix else [data.eos_id]
                if len(ctx) >= min_context and len(ctx) + len(tgt) + len(tail) <= seq_len:
                    seq = history + ctx + tgt + tail
                    window = seq[-seq_len:]
                    flag = [False] * seq_len
                    start = seq_len - len(tail) - len(tgt)
                    for i in range(start, start + len(tgt)):
                        flag[i] = True
                    rows.append(window)
                    targets.append(flag)
        history = (history + ids)[-seq_len:]
    return torch.tensor(rows, dtype=torch.int64), torch.tensor(targets, dtype=torch.bool)


@torch.no_grad()
def lambada_accuracy(model, ids, target, *, mask_id, batch_size=64, device="cpu") -> float:
    """Share of items whose target tokens are all recovered: the target is masked and decoded by
    the masked-diffusion sampler's rule (fill the most confident masked position, one per step).
    ids, target: (N, L) int64 / bool as from :func:`lambada_examples`."""
    model.eval()
    hits = 0
    for x, t in zip(ids.split(batch_size), target.split(batch_size), strict=True):
        x, t = x.to(device), t.to(device)
        cur = x.masked_fill(t, mask_id)
        for _ in range(int(t.sum(-1).max())):
            still = cur == mask_id
            if not still.any():
                break
            logits = model(cur).logits.float()
            conf, pred = logits.softmax(-1).max(-1)
            pos = conf.masked_fill(~still, -1.0).argmax(-1, keepdim=True)
            rows = still.any(-1, keepdim=True)
            fill = pred.gather(-1, pos)
            cur = cur.scatter(-1, pos, torch.where(rows, fill, cur.gather(-1, pos)))
        hits += int(((cur == x) | ~t).all(-1).sum())
    return hits / max(1, ids.shape[0])


def choice_examples(data, seq_len: int, n: int, choices: int, choice_len: int, seed: int = 0):
    """Multiple-choice items from held-out documents: the true ending is the document's last
    ``choice_len`` tokens, the others are the last tokens of other held-out documents (drawn by
    ``seed``); the context fills a ``seq_len`` window that ends at the <|eos|>. Returns
    (ids (N, C, L) int64 with the true ending at choice 0, ending (L,) bool positions)."""
    _, streams = _held_out_stream(data)
    endings = [ids[-1 - choice_len : -1] for ids in streams if len(ids) > choice_len + 8]
    gen = torch.Generator().manual_seed(seed)
    rows, history, k = [], [], 0
    for ids in streams:
        if len(ids) > choice_len + 8:
            if len(history) >= seq_len and len(rows) < n:
                context = (history + ids[: -1 - choice_len])[-(seq_len - choice_len - 1) :]
                others = [j for j in torch.randperm(len(endings), generator=gen).tolist() if j != k]
                picked = [endings[k]] + [endings[j] for j in others[: choices - 1]]
                rows.append([context + e + [data.eos_id] for e in picked])
            k += 1
        history = (history + ids)[-seq_len:]
    ending = torch.zeros(seq_len, dtype=torch.bool)
    ending[seq_len - 1 - choice_len : seq_len - 1] = True
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, choices, seq_len), ending


@torch.no_grad()
def choice_accuracy(
    model, ids, ending, *, mask_id, draws=2, seed=0, batch_size=64, device="cpu"
) -> float:
    """Share of items where the true ending (choice 0) has the highest masked-diffusion
    log-likelihood estimate given the context: for each number l = 1..K of masked ending tokens
    (K = ending length) and each of ``draws`` draws, l ending positions are masked and the
    estimate is -(K / l) x their cross-entropy (LLaDA's conditional likelihood estimator), averaged.
    Every choice of an item sees the same masks. ids (N, C, L) int64, ending (L,) bool."""
    model.eval()
    n, c, length = ids.shape
    pos = ending.nonzero()[:, 0]
    k = pos.numel()
    gen = torch.Generator().manual_seed(seed)
    masks = []
    for l_masked in range(1, k + 1):
        for _ in range(draws):
            m = torch.zeros(length, dtype=torch.bool)
            m[pos[torch.randperm(k, generator=gen)[:l_masked]]] = True
            masks.append(m)
    masks = torch.stack(masks)  # (D, L)
    weights = torch.tensor([k / int(m.sum()) for m in masks], dtype=torch.float64)
    flat = ids.reshape(n * c, length)
    scores = torch.zeros(n * c, dtype=torch.float64)
    for m, w in zip(masks, weights, strict=True):
        for start in range(0, n * c, batch_size):
            x = flat[start : start + batch_size].to(device)
            mm = m.to(device).expand_as(x)
            logits = model(x.masked_fill(mm, mask_id)).logits.float()
            logp = logits.log_softmax(-1).gather(-1, x[..., None])[..., 0]
            scores[start : start + x.shape[0]] += w * (logp * mm).sum(-1).double().cpu()
    best = scores.reshape(n, c).argmax(-1)
    return float((best == 0).double().mean())


# ---------------------------------------------------------------- one run


def outside_sink_fraction(trace, *, method="ratio", epsilon=3.0, k=2.0) -> float:
    """Share of real keys, over (step, layer, sequence, head), that the criterion does not flag."""
    real = trace.key_padding_mask[:, None, :, None, :].expand_as(trace.mass)
    flags = detect_sinks(trace.mass, method=method, epsilon=epsilon, k=k, key_padding_mask=real)
    return 1.0 - float(flags.sum()) / max(1, int(real.sum()))


METRICS = [
    # key, label, getter from a run record
    ("val_loss", "val bound (nats/token)", lambda r: r["val_loss"]),
    ("val_masked_accuracy", "val masked-token accuracy", lambda r: r["val_masked_accuracy"]),
    ("lambada_accuracy", "last-word accuracy (LAMBADA-like)", lambda r: r["lambada_accuracy"]),
    ("choice_accuracy", "multiple-choice accuracy", lambda r: r["choice_accuracy"]),
    ("sink_rate", "heads with a token sink", lambda r: r["sinks"]["sink_rate"]),
    ("move_rate", "dominant sink moves / step", lambda r: r["sinks"]["move_rate"]),
    ("position_spread", "dominant sink position std", lambda r: r["sinks"]["position_spread"]),
    ("outside_sink_set", "tokens outside the sink set", lambda r: r["outside_sink_set"]),
    ("sink_token_share", "sink-token share of attention", lambda r: r["sinks"]["sink_token_share"]),
    ("value_norm_sink", "value norm: token sinks", lambda r: r["sinks"]["value_norm_sink"]),
    ("value_norm_other", "value norm: other tokens", lambda r: r["sinks"]["value_norm_other"]),
    (
        "value_norm_sink_minus_other",
        "value norm: token sinks - others",
        lambda r: _sub(r["sinks"]["value_norm_sink"], r["sinks"]["value_norm_other"]),
    ),
    (
        "value_norm_sink_token",
        "value norm: sink token",
        lambda r: r["sinks"]["value_norm_sink_token"],
    ),
]


def _sub(a, b):
    return math.nan if a is None or b is None else a - b


def _num(v):
    return math.nan if v is None else float(v)


def _settings(args) -> dict:
    return {k: v for k, v in sorted(vars(args).items()) if k not in _NOT_SETTINGS}


def run_one(name, seed, data, evals, args, runs_dir: Path) -> dict:
    """Train and evaluate one (variant, seed) through sinkdlm.demo.run_variant plus the
    downstream scores; returns the run record (also written to runs/<name>-seed<seed>.json)."""
    run_args = copy.copy(args)
    run_args.seed = seed
    work = runs_dir / f"{name}-seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report, trace, losses, model = demo.run_variant(name, data, run_args, work)
    crit = dict(method=args.sink_method, epsilon=args.sink_epsilon, k=args.sink_k)
    (lam_ids, lam_target), (mc_ids, mc_ending) = evals
    record = {
        "variant": name,
        "seed": seed,
        "settings": _settings(args),
        **report,
        "outside_sink_set": outside_sink_fraction(trace, **crit),
        "lambada_accuracy": lambada_accuracy(
            model,
            lam_ids,
            lam_target,
            mask_id=data.mask_id,
            batch_size=args.eval_batch_size,
            device=args.device,
        ),
        "lambada_examples": int(lam_ids.shape[0]),
        "choice_accuracy": choice_accuracy(
            model,
            mc_ids,
            mc_ending,
            mask_id=data.mask_id,
            draws=args.choice_draws,
            batch_size=args.eval_batch_size,
            device=args.device,
        ),
        "choice_examples": int(mc_ids.shape[0]),
        "step_seconds": report["train_seconds"] / max(1, args.train_steps),
        "run_seconds": time.perf_counter() - t0,
        "loss_curve": losses[:: max(1, len(losses) // 100)],
    }
    path = runs_dir / f"{name}-seed{seed}.json"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(demo._json_safe(record), indent=1))
    tmp.replace(path)  # atomic: an interrupted run leaves no finished-looking record
    return record


# ---------------------------------------------------------------- aggregation and output


def summarize(records: dict, variants: list, seeds: list) -> dict:
    """Per variant and metric: mean +- 95% t-interval over seeds; per non-baseline variant: the
    paired difference to the baseline (same seed) with its interval and whether it excludes 0."""
    summary, diffs = {}, {}
    for name in variants:
        summary[name] = {
            key: {
                **mean_interval([_num(get(records[(name, s)])) for s in seeds]),
                "values": [_num(get(records[(name, s)])) for s in seeds],
            }
            for key, _, get in METRICS
        }
    if "baseline" in variants:
        for name in variants:
            if name == "baseline":
                continue
            diffs[name] = {}
            for key, _, get in METRICS:
                d = [
                    _num(get(records[(name, s)])) - _num(get(records[("baseline", s)]))
                    for s in seeds
                ]
                stat = mean_interval(d)
                lo, hi = stat["mean"] - stat["half_width"], stat["mean"] + stat["half_width"]
                stat["found"] = bool(math.isfinite(lo) and math.isfinite(hi) and (lo > 0 or hi < 0))
                diffs[name][key] = stat
    return {"per_variant": summary, "vs_baseline": diffs}


def _fmt(stat, digits=3) -> str:
    if not math.isfinite(stat["mean"]):
        return "-"
    if not math.isfinite(stat["half_width"]):
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['half_width']:.{digits}f}"


def format_markdown(summary: dict, variants: list) -> str:
    """Markdown tables: mean ± 95% interval per variant, then paired differences vs baseline
    (bold where the interval excludes zero)."""
    lines = ["| metric | " + " | ".join(variants) + " |", "|---" + "|---:" * len(variants) + "|"]
    for key, label, _ in METRICS:
        cells = [_fmt(summary["per_variant"][v][key]) for v in variants]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    others = list(summary["vs_baseline"])
    if others:
        lines += ["", "| difference vs baseline | " + " | ".join(others) + " |"]
        lines.append("|---" + "|---:" * len(others) + "|")
        for key, label, _ in METRICS:
            cells = []
            for v in others:
                stat = summary["vs_baseline"][v][key]
                cell = _fmt(stat)
                cells.append(f"**{cell}**" if stat.get("found") else cell)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_summary(summary: dict, variants: list, path) -> Path:
    """PNG: one panel per metric, a bar per variant (mean) with its 95% interval and the seeds."""
    from .analysis.plots import _pyplot

    plt = _pyplot()
    cols = 4
    rows = math.ceil(len(METRICS) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), dpi=110)
    for ax, (key, label, _) in zip(axes.flat, METRICS, strict=False):
        for i, v in enumerate(variants):
            stat = summary["per_variant"][v][key]
            if not math.isfinite(stat["mean"]):
                continue
            err = stat["half_width"] if math.isfinite(stat["half_width"]) else 0.0
            ax.bar(i, stat["mean"], yerr=err, capsize=3, color=f"C{i}", alpha=0.7)
            pts = [x for x in stat["values"] if math.isfinite(x)]
            ax.plot([i] * len(pts), pts, "k.", ms=3)
        ax.set_xticks(range(len(variants)), variants, rotation=45, ha="right", fontsize=7)
        ax.set_title(label, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(METRICS) :]:
        ax.axis("off")
    fig.suptitle("mean and 95% t-interval over seeds (dots: seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def _load_record(path: Path, settings: dict):
    record = json.loads(path.read_text())
    if record.get("settings") != settings:
        changed = sorted(
            k
            for k in set(settings) | set(record.get("settings", {}))
            if settings.get(k) != record.get("settings", {}).get(k)
        )
        raise SystemExit(
            f"{path} was run with other settings ({', '.join(changed)}): use another --out or "
            "the same flags to resume"
        )
    return record


def run_reproduce(args) -> dict:
    """Run (or resume) the experiment for parsed ``args``; returns the report (report.json)."""
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.seeds < 1:
        raise SystemExit(f"--seeds must be >= 1, got {args.seeds}")
    variants = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    variants = [v.strip() for v in variants if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)} or all")
    seeds = list(range(args.seed, args.seed + args.seeds))
    out_dir = Path(args.out)
    runs_dir = out_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    try:
        data = text_data.load_text_data(
            seq_len=args.seq_len, vocab_size=args.vocab_size, max_train_tokens=args.max_train_tokens
        )
    except text_data.CorpusMissingError as err:
        raise SystemExit(str(err)) from err
    evals = (
        lambada_examples(data, args.seq_len, args.lambada_examples),
        choice_examples(data, args.seq_len, args.choice_examples, args.choices, args.choice_len),
    )
    print(
        f"data: {data.train.shape[0]} train / {data.val.shape[0]} validation sequences of "
        f"{args.seq_len} tokens; {evals[0][0].shape[0]} last-word and {evals[1][0].shape[0]} "
        f"multiple-choice items; {len(variants)} variants x {len(seeds)} seeds"
    )
    settings = _settings(args)
    records = {}
    todo = []
    # Seed-major order: a run stopped early leaves whole seeds of every variant (paired data).
    for seed in seeds:
        for name in variants:
            path = runs_dir / f"{name}-seed{seed}.json"
            if path.is_file():
                records[(name, seed)] = _load_record(path, settings)
            else:
                todo.append((name, seed))
    if len(todo) < len(variants) * len(seeds):
        print(f"resuming: {len(records)} runs already done in {runs_dir}")
    for name, seed in tqdm(todo, desc="runs", unit="run", dynamic_ncols=True):
        path = runs_dir / f"{name}-seed{seed}.json"
        if path.is_file():  # finished meanwhile by another call on the same folder
            records[(name, seed)] = _load_record(path, settings)
        else:
            records[(name, seed)] = run_one(name, seed, data, evals, args, runs_dir)

    summary = summarize(records, variants, seeds)
    table = format_markdown(summary, variants)
    plot = plot_summary(summary, variants, out_dir / "reproduce.png")
    report = {
        "args": vars(args),
        "variants": variants,
        "seeds": seeds,
        "parameters": {v: records[(v, seeds[0])]["parameters"] for v in variants},
        "step_seconds": {
            v: mean_interval([records[(v, s)]["step_seconds"] for s in seeds])["mean"]
            for v in variants
        },
        "summary": summary,
        "table_markdown": table,
        "plot": str(plot),
        "machine": _machine(),
        "wall_seconds_this_call": time.perf_counter() - start,
        "run_seconds_total": sum(r["run_seconds"] for r in records.values()),
    }
    (out_dir / "report.json").write_text(json.dumps(demo._json_safe(report), indent=2))
    (out_dir / "table.md").write_text(table + "\n")
    print("\n" + table + "\n")
    print(
        f"wrote report.json, table.md and {plot.name} to {out_dir.resolve()} "
        f"({report['run_seconds_total']:.0f} s of runs in all)"
    )
    return report


def _machine() -> dict:
    from .ops.cpu_paths import cpu_model

    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
