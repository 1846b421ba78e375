"""Fused remasking step (sinkdlm.remask_step) vs the LLaDA-style PyTorch reference step.

Shapes of a real sampler: B·L = 8·1024 masked positions, vocabularies of LLaDA-8B (126464) and
Dream-7B (152064), bfloat16 logits, low_confidence, temperature 0 (LLaDA's defaults), every
position masked (the worst case: every position's logits are read). The reference is
sinkdlm.remask_step_reference (float64 softmax over the vocabulary, gather, mask, top-k), eager
and under torch.compile; it runs one batch row at a time because its float64 temporaries for
the whole batch (2 x 8 GB) do not fit in this machine's memory. Reports time (best of
--repeats), speed-up, and the fused step's logits read rate against the device's copy bandwidth
(measured here: best of timed dst.copy_(src) over a 1 GiB buffer, counting read + write).

Usage: PYTHONPATH=python python3 benchmarks/remask.py [--devices cpu cuda] [--repeats 2]
Writes benchmarks/results/remask_<device>.json and .png (--tag adds a suffix). On the CPU the
JSON records the CPU model, its ISA flags and the fused step's code path (the instruction set of
each cloned loop, which GCC's target_clones pick at load time). --no-eager skips the eager
reference (then the outputs are checked against the compiled one only, or not at all).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import sinkdlm
from sinkdlm.ops.cpu_paths import cpu_features, cpu_model

MASK_IDS = {126464: 126336, 152064: 151666}  # LLaDA-8B, Dream-7B
RESULTS = Path(__file__).resolve().parent / "results"


def cpu_path() -> str:
    """The fused CPU step's loops as target_clones picks them here (remask_step_cpu.cpp clones its
    own loops for avx2 / default, row_ops' exp sums for avx512f / avx2+fma / default)."""
    isa = cpu_features()
    exp = "avx512f" if "avx512f" in isa else "avx2+fma" if {"avx2", "fma"} <= isa else "default"
    convert = "avx2" if "avx2" in isa else "default"
    return f"bf16 convert/max: {convert} clone, exp sums: {exp} clone"


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def best_time(fn, device: str, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def copy_bandwidth(device: str, repeats: int) -> float:
    """Bytes read + written per second by a 1 GiB device-to-same-device copy."""
    src = torch.empty(2**30, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch
    seconds = best_time(lambda: dst.copy_(src), device, max(repeats, 3))
    return 2 * src.numel() / seconds


def per_row(step, logits, x, mask_id, num_transfer):
    outputs = [
        step(logits[b : b + 1], x[b : b + 1], mask_id, num_transfer[b : b + 1])
        for b in range(logits.shape[0])
    ]
    return tuple(torch.cat(parts) for parts in zip(*outputs, strict=True))


OUTPUTS = ("x_new", "transferred", "confidence")


def mismatches(fused_out, reference_out) -> list[str]:
    """The outputs (x_new, transferred, confidence) on which the fused step and the reference
    disagree: tokens and picks exactly, confidences within float32 rounding of the float64
    reference."""
    bad = []
    for name, got, want in zip(OUTPUTS, fused_out, reference_out, strict=True):
        if name == "confidence":
            same = got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-6)
        else:
            same = torch.equal(got, want)
        if not same:
            bad.append(name)
    return bad


def require_match(rows) -> None:
    """Exits non-zero (no results written) when any row's outputs differ from the reference."""
    bad = [
        f"V={r['vocab']} vs {kind}: {', '.join(r[f'mismatch_{kind}'])}"
        for r in rows
        for kind in ("eager", "compiled")
        if r.get(f"mismatch_{kind}")
    ]
    if bad:
        raise SystemExit("remask benchmark: fused step and reference differ: " + "; ".join(bad))


def run(device: str, vocab: int, args, compiled_reference) -> dict:
    batch, length = args.batch, args.length
    mask_id = MASK_IDS.get(vocab, vocab - 1)
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(batch, length, vocab, generator=gen, device=device, dtype=torch.bfloat16)
    x = torch.full((batch, length), mask_id, dtype=torch.int64, device=device)
    num_transfer = torch.full((batch,), args.num_transfer, dtype=torch.int64, device=device)

    def fused():
        return sinkdlm.remask_step(logits, x, mask_id, num_transfer)

    def eager():
        return per_row(sinkdlm.remask_step_reference, logits, x, mask_id, num_transfer)

    def compiled():
        return per_row(compiled_reference, logits, x, mask_id, num_transfer)

    fused_out = fused()  # warm-up
    fused_s = best_time(fused, device, args.repeats)
    row = dict(
        device=device,
        vocab=vocab,
        batch=batch,
        length=length,
        logits_bytes=logits.numel() * logits.element_size(),
        fused_s=fused_s,
    )
    if not getattr(args, "no_eager", False):
        eager_out = eager()
        row["eager_s"] = best_time(eager, device, args.repeats)
        row["mismatch_eager"] = mismatches(fused_out, eager_out)
    if compiled_reference is not None:
        compiled_out = compiled()  # compiles
        row["compiled_s"] = best_time(compiled, device, args.repeats)
        row["mismatch_compiled"] = mismatches(fused_out, compiled_out)
    return row


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"V={r['vocab']}" for r in rows]
    kinds = [
        ("fused_s", "fused"),
        ("eager_s", "reference eager"),
        ("compiled_s", "reference compiled"),
    ]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.25
    for k, (key, name) in enumerate(kinds):
        values = [r.get(key, float("nan")) * 1e3 for r in rows]
        ax.bar([i + (k - 1) * width for i in range(len(rows))], values, width, label=name)
    ax.set_xticks(range(len(rows)), labels)
    ax.set_ylabel("ms per step (log)")
    ax.set_yscale("log")
    ax.set_title(f"remask step, {rows[0]['device']}, B·L = {rows[0]['batch']}·{rows[0]['length']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", nargs="+", default=None)
    parser.add_argument("--vocabs", nargs="+", type=int, default=[126464, 152064])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--num-transfer", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-eager", action="store_true")
    parser.add_argument("--tag", default="", help="suffix of the result files' names")
    args = parser.parse_args()
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    RESULTS.mkdir(parents=True, exist_ok=True)

    for device in devices:
        bandwidth = copy_bandwidth(device, args.repeats)
        compiled_reference = None
        if not args.no_compile:
            compiled_reference = torch.compile(sinkdlm.remask_step_reference, dynamic=False)
        rows = [
            run(device, vocab, args, compiled_reference)
            for vocab in tqdm(args.vocabs, desc=f"remask {device}")
        ]
        name = torch.cuda.get_device_name() if device == "cuda" else cpu_model()
        path = "CUDA kernel" if device == "cuda" else cpu_path()
        print(
            f"\n{device} ({name}, {torch.get_num_threads()} threads; {path}); copy bandwidth "
            f"{bandwidth / 1e9:.1f} GB/s (read + write); B·L = {args.batch}·{args.length}, "
            "bf16, low_confidence, T = 0"
        )
        header = (
            f"{'V':>7} {'fused ms':>9} {'eager ms':>9} {'compiled ms':>11} {'eager/fused':>11} "
            f"{'compiled/fused':>14} {'fused GB/s':>10} {'% copy bw':>9} {'match':>5}"
        )
        print(header)
        for r in rows:
            r["copy_bandwidth_Bps"] = bandwidth
            r["fused_read_Bps"] = r["logits_bytes"] / r["fused_s"]
            compiled_ms = r.get("compiled_s", float("nan")) * 1e3
            eager_ms = r.get("eager_s", float("nan")) * 1e3
            match = not r.get("mismatch_eager") and not r.get("mismatch_compiled")
            print(
                f"{r['vocab']:>7} {r['fused_s'] * 1e3:>9.1f} {eager_ms:>9.1f} "
                f"{compiled_ms:>11.1f} {eager_ms / 1e3 / r['fused_s']:>11.1f} "
                f"{compiled_ms / 1e3 / r['fused_s']:>14.1f} {r['fused_read_Bps'] / 1e9:>10.1f} "
                f"{100 * r['fused_read_Bps'] / bandwidth:>9.0f} {'yes' if match else 'NO':>5}"
            )
        require_match(rows)
        result = dict(
            device=device,
            device_name=name,
            path=path,
            isa=sorted(cpu_features()) if device == "cpu" else None,
            threads=torch.get_num_threads(),
            torch=torch.__version__,
            rows=rows,
        )
        (RESULTS / f"remask_{device}{args.tag}.json").write_text(json.dumps(result, indent=2))
        plot(rows, RESULTS / f"remask_{device}{args.tag}.png")


if __name__ == "__main__":
    main()
