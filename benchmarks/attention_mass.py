"""sinkdlm.analysis.attention_mass on the CPU vs the plain-PyTorch way to the same numbers.

Methods, on the same q, k, sink key and the forward's lse:
  sinkdlm   sinkdlm.analysis.attention_mass: score blocks by the BLAS GEMM, exp(S - lse) and
            the column sums in vectors, never L x L
  dense     PyTorch: S = scale q k^T for 256 queries at a time in float32, exp(S - lse), summed
            over the queries (the straightforward form; it materialises 256 x L scores)
  attention sinkdlm.sink_attention's forward on the same inputs, for scale: the mass is one more
            pass of the same size, less the P V product

Both mass methods must agree (max abs difference below 1e-5 of a mass that sums to 1), or the
run fails. The JSON records the CPU model, its ISA flags and the threads; methods are
interleaved within each repeat and the best kept.

    python3 benchmarks/attention_mass.py --out benchmarks/results/attention_mass_cpu_intel_amx.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

import sinkdlm
from sinkdlm.analysis import attention_mass
from sinkdlm.ops.cpu_paths import cpu_features, cpu_model

RESULTS = Path(__file__).resolve().parent / "results"


def dense_mass(q, k, lse, sink_k, scale, chunk=256):
    """(mass (B, H, L), sink_mass (B, H)) in float32: the plain form, `chunk` queries at a time."""
    q, k, lse, sink_k = q.float(), k.float(), lse.float(), sink_k.float()
    mass = torch.zeros(q.shape[:3])
    sink = torch.zeros(q.shape[:2])
    for i in range(0, q.shape[2], chunk):
        qi, li = q[:, :, i : i + chunk], lse[:, :, i : i + chunk, None]
        mass += torch.exp(scale * qi @ k.transpose(-1, -2) - li).sum(2)
        sink += torch.exp(scale * qi @ sink_k[None, :, :, None] - li).sum((2, 3))
    return mass / q.shape[2], sink / q.shape[2]


def bench_config(dtype, L, D, tokens, heads, reps):
    B = max(1, tokens // L)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, heads, L, D, generator=g).to(dtype) for _ in range(3))
    sink_k, sink_v = (torch.randn(heads, D, generator=g).to(dtype) for _ in range(2))
    scale = D**-0.5
    _, lse = sinkdlm.sink_attention(q, k, v, sink_k, sink_v, return_lse=True)
    methods = {
        "sinkdlm": lambda: attention_mass(q, k, lse, sink_k),
        "dense": lambda: dense_mass(q, k, lse, sink_k, scale),
        "attention": lambda: sinkdlm.sink_attention(q, k, v, sink_k, sink_v),
    }
    got, want = methods["sinkdlm"](), methods["dense"]()
    diff = max((a.float() - b).abs().max().item() for a, b in zip(got, want, strict=True))
    best = dict.fromkeys(methods, float("inf"))
    for _ in range(reps):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return B, {name: 1e3 * t for name, t in best.items()}, diff


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096])
    ap.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    ap.add_argument("--tokens", type=int, default=4096, help="B * L per batch")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "attention_mass_cpu.json")
    args = ap.parse_args(argv)
    machine = dict(
        cpu=cpu_model(),
        isa=sorted(cpu_features()),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        load_average_at_start=list(os.getloadavg()),
    )
    print(f"CPU: {machine['cpu']}  {machine['threads']} threads  torch {machine['torch']}")
    configs = [(dt, D, L) for dt in args.dtypes for D in args.head_dims for L in args.lengths]
    rows = []
    for dtype, D, L in tqdm(configs, desc="attention_mass"):
        B, ms, diff = bench_config(getattr(torch, dtype), L, D, args.tokens, args.heads, args.reps)
        if diff > 1e-5:
            raise SystemExit(
                f"sinkdlm and dense mass disagree by {diff:.2e} ({dtype}, D {D}, L {L})"
            )
        rows.append(
            dict(
                dtype=dtype,
                D=D,
                L=L,
                B=B,
                H=args.heads,
                ms=ms,
                max_abs_diff=diff,
                dense_over_sinkdlm=ms["dense"] / ms["sinkdlm"],
                sinkdlm_over_attention=ms["sinkdlm"] / ms["attention"],
            )
        )
    print("| dtype | D | L | B | sinkdlm ms | dense ms | attention fwd ms | dense / sinkdlm | "
          "sinkdlm / attention |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        m = r["ms"]
        print(f"| {r['dtype']} | {r['D']} | {r['L']} | {r['B']} | {m['sinkdlm']:.1f} | "
              f"{m['dense']:.1f} | {m['attention']:.1f} | {r['dense_over_sinkdlm']:.2f}x | "
              f"{r['sinkdlm_over_attention']:.2f}x |")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(machine=machine, rows=rows), indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
