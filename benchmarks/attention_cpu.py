"""CPU sink attention: sinkdlm's two CPU paths vs the plain-PyTorch ways to the same numbers.

Methods, all on the same inputs (q, k, v and a sink token's k/v):
  native        sinkdlm.sink_attention(..., backend="native"): sinkdlm's own kernel
  composed      sinkdlm.sink_attention(..., backend="composed"): ATen's CPU flash attention over
                the real keys, then sinkdlm's fused sink merge
  sdpa_concat   F.scaled_dot_product_attention on [sink ; kv] (the best plain-PyTorch way)
  sdpa_mask     (--with-mask) the paper's form: a sink token inserted into q/k/v, dense mask
  flash_nosink  F.scaled_dot_product_attention on q, k, v with no sink at all: ATen's CPU flash
                kernel alone, the ceiling (a sink attention cannot beat it by much)
"sinkdlm" in the table is what backend="auto" runs (sinkdlm.ops.cpu_paths.cpu_auto_backend):
one of native / composed, named in the path column with the GEMM engine it uses
(SINKDLM_CPU_BF16_GEMM=avx512_bf16|fp32|portable forces the native kernel's bf16 one).

The JSON records the CPU model, its ISA flags, torch's CPU capability and the threads.
Methods are interleaved within each repeat and the best of the repeats is kept, so load
from other processes hits all of them alike; the ratios are what to read.

    python3 benchmarks/attention_cpu.py                  # the README table
    python3 benchmarks/attention_cpu.py --lengths 256 1024 --reps 2 --dtypes bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

import sinkdlm
from sinkdlm.ops.cpu_paths import cpu_auto_backend, cpu_features, cpu_model

RESULTS = Path(__file__).resolve().parent / "results"


def path_of(backend: str, dtype: torch.dtype) -> str:
    """The code path a sinkdlm backend takes for dtype on this CPU, in words."""
    if backend == "composed":
        return "composed: ATen CPU flash (oneDNN brgemm) + sinkdlm merge"
    if dtype == torch.bfloat16:
        gemm = sinkdlm._C.cpu_bf16_gemm()
        return {
            "avx512_bf16": "native: vdpbf16ps bf16 GEMMs",
            "fp32": "native: sgemm on bf16->fp32",
        }.get(gemm, f"native: {gemm} bf16 GEMMs")
    return "native: BLAS sgemm"


def make_methods(q, k, v, sink_k, sink_v, with_mask):
    B, H, L, D = q.shape

    def native():
        return sinkdlm.sink_attention(q, k, v, sink_k, sink_v, backend="native")

    def composed():
        return sinkdlm.sink_attention(q, k, v, sink_k, sink_v, backend="composed")

    def sdpa_concat():
        kk = torch.cat([sink_k.expand(B, H, D).unsqueeze(2), k], dim=2)
        vv = torch.cat([sink_v.expand(B, H, D).unsqueeze(2), v], dim=2)
        return F.scaled_dot_product_attention(q, kk, vv)

    def flash_nosink():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    methods = {
        "native": native,
        "composed": composed,
        "sdpa_concat": sdpa_concat,
        "flash_nosink": flash_nosink,
    }
    if with_mask:
        mask = sinkdlm.sink_attention_mask(L, 0)

        def sdpa_mask():
            def insert(x, tok):
                return torch.cat([tok.expand(B, H, D).unsqueeze(2), x], dim=2)

            out = F.scaled_dot_product_attention(
                insert(q, sink_k), insert(k, sink_k), insert(v, sink_v), attn_mask=mask
            )
            return out[:, :, 1:]

        methods["sdpa_mask"] = sdpa_mask
    return methods


def time_once(fn, grad_out=None) -> float:
    start = time.perf_counter()
    out = fn()
    if grad_out is not None:
        out.backward(grad_out)
    return time.perf_counter() - start


def bench_config(dtype, L, D, tokens, heads, reps, backward, with_mask):
    B = max(1, tokens // L)
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_(backward)

    q, k, v = randn(B, heads, L, D), randn(B, heads, L, D), randn(B, heads, L, D)
    sink_k, sink_v = randn(heads, D), randn(heads, D)
    methods = make_methods(q, k, v, sink_k, sink_v, with_mask)
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
    axes_list = list(axes) if len(modes) > 1 else [axes]
    for ax, mode in zip(axes_list, modes, strict=True):
        for key in sorted({(r["dtype"], r["D"]) for r in rows}):
            line = [r for r in rows if r["mode"] == mode and (r["dtype"], r["D"]) == key]
            ax.plot(
                [r["L"] for r in line],
                [r["speedup_vs_sdpa_concat"] for r in line],
                "o-",
                label=f"{key[0]} D={key[1]}",
            )
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length L (B·L fixed)")
        ax.set_title(f"{mode}: sinkdlm (auto) vs SDPA on [sink ; kv]")
        ax.grid(alpha=0.3)
    axes_list[0].set_ylabel("speed-up (x)")
    axes_list[0].legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def machine_info() -> dict:
    return dict(
        cpu=cpu_model(),
        isa=sorted(cpu_features()),
        torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
        native_bf16_gemm=sinkdlm._C.cpu_bf16_gemm(),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        python=platform.python_version(),
        load_average_at_start=list(os.getloadavg()),
    )


def markdown_table(rows) -> str:
    """The README's table of a run's rows (times in ms, best of the repeats)."""
    lines = [
        "| dtype | pass | D | L | B | native ms | composed ms | concat ms | no-sink ms | "
        "auto's path | vs concat | / no-sink |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        ms = r["ms"]
        lines.append(
            f"| {r['dtype']} | {r['mode']} | {r['D']} | {r['L']} | {r['B']} | "
            f"{ms['native']:.1f} | {ms['composed']:.1f} | {ms['sdpa_concat']:.1f} | "
            f"{ms['flash_nosink']:.1f} | {r['path']} | {r['speedup_vs_sdpa_concat']:.2f}x | "
            f"{r['time_vs_flash_nosink']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"])
    ap.add_argument("--lengths", nargs="+", type=int, default=[256, 1024, 4096])
    ap.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    ap.add_argument("--tokens", type=int, default=4096, help="B * L per batch")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--with-mask", action="store_true", help="also time the dense-mask form")
    ap.add_argument("--out", type=Path, default=RESULTS / "attention_cpu.json")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument(
        "--table-from", type=Path, help="print the markdown table of an earlier run's JSON only"
    )
    args = ap.parse_args(argv)
    if args.table_from:
        print(markdown_table(json.loads(args.table_from.read_text())["rows"]))
        return 0

    machine = machine_info()
    features = cpu_features()
    print(
        f"CPU: {machine['cpu']}  ISA: {' '.join(machine['isa'])}  "
        f"torch {machine['torch']} ({machine['torch_cpu_capability']}), "
        f"{machine['threads']} threads"
    )
    configs = [
        (dtype, D, L, mode)
        for dtype in args.dtypes
        for D in args.head_dims
        for L in args.lengths
        for mode in args.modes
    ]
    rows = []
    for dtype, D, L, mode in tqdm(configs, desc="attention_cpu"):
        dt = getattr(torch, dtype)
        B, best = bench_config(
            dt, L, D, args.tokens, args.heads, args.reps, mode == "fwd+bwd", args.with_mask
        )
        auto = cpu_auto_backend(features, dt, needs_grad=mode == "fwd+bwd")
        ours = best[auto]
        rows.append(
            dict(
                dtype=dtype,
                L=L,
                B=B,
                H=args.heads,
                D=D,
                mode=mode,
                auto=auto,
                path=path_of(auto, dt),
                paths={b: path_of(b, dt) for b in ("native", "composed")},
                ms={name: 1e3 * t for name, t in best.items()},
                speedup_vs_sdpa_concat=best["sdpa_concat"] / ours,
                time_vs_flash_nosink=ours / best["flash_nosink"],
                composed_vs_native=best["native"] / best["composed"],
            )
        )

    header = (
        f"{'dtype':9} {'mode':8} {'D':>4} {'L':>5} {'B':>3} {'native':>8} {'composed':>9} "
        f"{'concat':>8} {'nosink':>8} {'auto':>9} {'vs concat':>9} {'/ nosink':>9}  path"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        ms = r["ms"]
        print(
            f"{r['dtype']:9} {r['mode']:8} {r['D']:>4} {r['L']:>5} {r['B']:>3} "
            f"{ms['native']:>8.1f} {ms['composed']:>9.1f} {ms['sdpa_concat']:>8.1f} "
            f"{ms['flash_nosink']:>8.1f} {r['auto']:>9} {r['speedup_vs_sdpa_concat']:>8.2f}x "
            f"{r['time_vs_flash_nosink']:>8.2f}x  {r['path']}"
        )
    machine["load_average_at_end"] = list(os.getloadavg())
    print("\n" + markdown_table(rows) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(machine=machine, rows=rows), indent=1))
    if not args.no_plot:
        plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
