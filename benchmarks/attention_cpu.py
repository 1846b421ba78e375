"""CPU sink attention: sinkdlm vs the plain-PyTorch ways to get the same numbers.

Methods, all on the same inputs (q, k, v and a sink token's k/v):
  sinkdlm       sinkdlm.sink_attention(q, k, v, sink_k, sink_v)
  sdpa_concat   F.scaled_dot_product_attention on [sink ; kv] (the best plain-PyTorch way)
  sdpa_mask     the paper's form: a sink token inserted into q/k/v, dense sink mask, SDPA

Writes the table as JSON and the speed-ups as a PNG (--out, .json / .png).
Methods are interleaved within each repeat and the best of the repeats is kept, so load
from other processes hits all of them alike; the ratios are what to read.

    python3 benchmarks/attention_cpu.py                  # the README table
    python3 benchmarks/attention_cpu.py --lengths 256 1024 --reps 2
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import sinkdlm

RESULTS = Path(__file__).resolve().parent / "results"


def make_methods(q, k, v, sink_k, sink_v):
    B, H, L, D = q.shape

    def sinkdlm_op():
        return sinkdlm.sink_attention(q, k, v, sink_k, sink_v)

    def sdpa_concat():
        kk = torch.cat([sink_k.expand(B, H, D).unsqueeze(2), k], dim=2)
        vv = torch.cat([sink_v.expand(B, H, D).unsqueeze(2), v], dim=2)
        return F.scaled_dot_product_attention(q, kk, vv)

    mask = sinkdlm.sink_attention_mask(L, 0)

    def sdpa_mask():
        def insert(x, tok):
            return torch.cat([tok.expand(B, H, D).unsqueeze(2), x], dim=2)

        out = F.scaled_dot_product_attention(
            insert(q, sink_k), insert(k, sink_k), insert(v, sink_v), attn_mask=mask
        )
        return out[:, :, 1:]

    return {"sinkdlm": sinkdlm_op, "sdpa_concat": sdpa_concat, "sdpa_mask": sdpa_mask}


def time_once(fn, grad_out=None) -> float:
    start = time.perf_counter()
    out = fn()
    if grad_out is not None:
        out.backward(grad_out)
    return time.perf_counter() - start


def bench_config(dtype, L, D, tokens, heads, reps, backward):
    B = max(1, tokens // L)
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_(backward)

    q, k, v = randn(B, heads, L, D), randn(B, heads, L, D), randn(B, heads, L, D)
    sink_k, sink_v = randn(heads, D), randn(heads, D)
    methods = make_methods(q, k, v, sink_k, sink_v)
    grad_out = torch.randn(B, heads, L, D, generator=g).to(dtype) if backward else None
    best = {name: float("inf") for name in methods}
    for fn in methods.values():  # warm-up
        time_once(fn, grad_out)
    for _ in range(reps):
        for name, fn in methods.items():
            best[name] = min(best[name], time_once(fn, grad_out))
    return B, best


def plot(rows, path):
    """Speed-up over SDPA-concat against L: one panel per pass, one line per (dtype, D)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r["mode"] for r in rows})
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), sharey=True, dpi=120)
    for ax, mode in zip(list(axes) if len(modes) > 1 else [axes], modes, strict=True):
        for key in sorted({(r["dtype"], r["D"]) for r in rows}):
            line = [r for r in rows if r["mode"] == mode and (r["dtype"], r["D"]) == key]
            lengths = [r["L"] for r in line]
            ax.plot(
                lengths,
                [r["speedup_vs_sdpa_concat"] for r in line],
                "o-",
                label=f"{key[0]} D={key[1]}",
            )
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length L (B·L fixed)")
        ax.set_title(f"{mode}: sinkdlm vs SDPA on [sink ; kv]")
        ax.grid(alpha=0.3)
    axes_list = list(axes) if len(modes) > 1 else [axes]
    axes_list[0].set_ylabel("speed-up (x)")
    axes_list[0].legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--lengths", nargs="+", type=int, default=[256, 512, 1024, 2048, 4096])
    ap.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    ap.add_argument("--tokens", type=int, default=4096, help="B * L per batch")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "attention_cpu.json")
    args = ap.parse_args()

    configs = [
        (dtype, L, D, mode)
        for dtype in args.dtypes
        for D in args.head_dims
        for L in args.lengths
        for mode in ("fwd", "fwd+bwd")
    ]
    rows = []
    for dtype, L, D, mode in tqdm(configs, desc="attention_cpu"):
        B, best = bench_config(
            getattr(torch, dtype),
            L,
            D,
            args.tokens,
            args.heads,
            args.reps,
            backward=mode == "fwd+bwd",
        )
        rows.append(
            dict(
                dtype=dtype,
                L=L,
                B=B,
                H=args.heads,
                D=D,
                mode=mode,
                ms={k: 1e3 * v for k, v in best.items()},
                speedup_vs_sdpa_concat=best["sdpa_concat"] / best["sinkdlm"],
                speedup_vs_sdpa_mask=best["sdpa_mask"] / best["sinkdlm"],
            )
        )

    header = (
        f"{'dtype':9} {'mode':8} {'D':>4} {'L':>5} {'B':>3} {'sinkdlm ms':>11} "
        f"{'concat ms':>10} {'mask ms':>9} {'vs concat':>9} {'vs mask':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        ms = r["ms"]
        print(
            f"{r['dtype']:9} {r['mode']:8} {r['D']:>4} {r['L']:>5} {r['B']:>3} "
            f"{ms['sinkdlm']:>11.1f} {ms['sdpa_concat']:>10.1f} {ms['sdpa_mask']:>9.1f} "
            f"{r['speedup_vs_sdpa_concat']:>8.2f}x {r['speedup_vs_sdpa_mask']:>7.2f}x"
        )
    machine = dict(
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        cpu=platform.processor() or platform.machine(),
        python=platform.python_version(),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(machine=machine, rows=rows), indent=1))
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
