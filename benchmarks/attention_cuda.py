"""CUDA sink attention: sinkdlm against SDPA with no sink, SDPA on [sink ; kv], FlexAttention.

Methods, on the same inputs (q, k, v and a sink token's k/v, one sink shared by the batch):
  sinkdlm          sinkdlm.sink_attention(q, k, v, sink_k, sink_v, backend="composed") (what
                   "auto" runs on CUDA): ATen's fused attention over the keys, the sink merged
                   in through the log-sum-exp (forward and backward)
  sdpa_nosink      F.scaled_dot_product_attention(q, k, v) with no sink at all: the ceiling
  concat_<backend> SDPA on [sink ; kv] under sdpa_kernel(<backend>) (flash, efficient, cudnn);
                   K/V are repeated per query head where the backend takes no GQA
  flex             FlexAttention on the paper's form: a sink token inserted at position 0 of
                   q/k/v, its row seeing only itself (block mask), torch.compile'd

Passes: fwd, and fwd+bwd (backward of sum(out * dO)). Reported per (D, heads, L): milliseconds,
TFLOP/s of the attention over the L real keys (4 B H L^2 D for fwd, 3.5x that for fwd+bwd, the
same count for every method), the ratios sinkdlm / sdpa_nosink and sinkdlm / best concat, and the
peak memory each call allocates beyond its inputs. Methods are interleaved within each repeat and
the median is kept. Writes JSON (--out).

Needs a CUDA GPU. --dry-run runs every code path on the CPU with tiny sizes (float32; the CPU's
SDPA backends; eager FlexAttention) to check the script, not to measure anything.

    python benchmarks/attention_cuda.py                       # the README table (bf16)
    python benchmarks/attention_cuda.py --lengths 2048 --head-dims 128 --reps 5
    python benchmarks/attention_cuda.py --dry-run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import sinkdlm
from sinkdlm.ops.cpu_paths import cpu_model

RESULTS = Path(__file__).resolve().parent / "results"
CONCAT_BACKENDS = {
    "cuda": {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    },
    "cpu": {"flash": SDPBackend.FLASH_ATTENTION},  # --dry-run
}
DIFF_WARN = 0.1  # max |out - sinkdlm's out| flagged in the table (bf16 on unit-variance inputs)
SDP_CHOICE_NAMES = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}


def attention_flops(B, H, L, D, mode):
    fwd = 4 * B * H * L * L * D
    return fwd if mode == "fwd" else 3.5 * fwd


def make_methods(q, k, v, sink_k, sink_v, flex_mode):
    """name -> callable returning the (B, H, L, D) output, all computing the same attention.
    flex_mode: "compiled", "eager" (--dry-run) or None (no FlexAttention)."""
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    gqa = H != Hkv
    device = q.device.type

    def sinkdlm_op():  # on CUDA "composed" is what "auto" runs; on the CPU it is not
        return sinkdlm.sink_attention(q, k, v, sink_k, sink_v, backend="composed")

    def sdpa_nosink():
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)

    def concat_kv():
        kk = torch.cat([sink_k.expand(B, Hkv, D).unsqueeze(2), k], dim=2)
        vv = torch.cat([sink_v.expand(B, Hkv, D).unsqueeze(2), v], dim=2)
        return kk, vv

    def concat(backend):
        def run():
            kk, vv = concat_kv()
            with sdpa_kernel(backend):
                try:
                    return F.scaled_dot_product_attention(q, kk, vv, enable_gqa=gqa)
                except RuntimeError:
                    if not gqa:
                        raise
                # This backend takes no grouped heads: repeat K/V per query head.
                kk, vv = kk.repeat_interleave(H // Hkv, 1), vv.repeat_interleave(H // Hkv, 1)
                return F.scaled_dot_product_attention(q, kk, vv)

        return run

    methods = {"sinkdlm": sinkdlm_op, "sdpa_nosink": sdpa_nosink}
    for name, backend in CONCAT_BACKENDS[device].items():
        methods[f"concat_{name}"] = concat(backend)
    if flex_mode is None:
        return methods
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def sink_row_sees_itself(b, h, q_idx, kv_idx):
        return (q_idx != 0) | (kv_idx == 0)

    block_mask = create_block_mask(
        sink_row_sees_itself, None, None, L + 1, L + 1, device=q.device.type
    )
    flex_fn = torch.compile(flex_attention) if flex_mode == "compiled" else flex_attention

    def flex():
        def insert(x, tok):
            return torch.cat([tok.expand(B, x.shape[1], D).unsqueeze(2), x], dim=2)

        out = flex_fn(
            insert(q, sink_k.repeat_interleave(H // Hkv, 0)),
            insert(k, sink_k),
            insert(v, sink_v),
            block_mask=block_mask,
            enable_gqa=gqa,
        )
        return out[:, :, 1:]

    methods["flex"] = flex
    return methods


class Timer:
    """Wall time of one call: CUDA events on a GPU, perf_counter on the CPU (--dry-run)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


def peak_extra_bytes(fn, device) -> int | None:
    """Memory one call allocates at its peak beyond what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def run_pass(fn, inputs, grad_out):
    """One call: forward, and with grad_out the backward of sum(out * grad_out)."""

    def call():
        out = fn()
        if grad_out is not None:
            out.backward(grad_out)

    def reset():
        for t in inputs:
            t.grad = None

    return call, reset


def bench_config(device, dtype, L, D, H, Hkv, tokens, reps, mode, flex_mode):
    B = max(1, tokens // L)
    g = torch.Generator().manual_seed(0)
    backward = mode == "fwd+bwd"

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_(backward)

    q, k, v = randn(B, H, L, D), randn(B, Hkv, L, D), randn(B, Hkv, L, D)
    sink_k, sink_v = randn(Hkv, D), randn(Hkv, D)
    inputs = [q, k, v, sink_k, sink_v]
    grad_out = torch.randn(B, H, L, D, generator=g).to(device, dtype) if backward else None
    methods = make_methods(q, k, v, sink_k, sink_v, flex_mode)
    timer = Timer(device)
    times = {name: [] for name in methods}
    peak = {}
    failed = {}
    max_abs_diff = {}
    reference = None
    for name, fn in list(methods.items()):
        call, reset = run_pass(fn, inputs, grad_out)
        try:
            reset()
            out = fn()  # warm-up (and compilation); every method must give sinkdlm's numbers
            if grad_out is not None:
                out.backward(grad_out)
            out = out.detach().float()
            reference = out if reference is None else reference
            if name != "sdpa_nosink":  # the ceiling computes another function (no sink)
                max_abs_diff[name] = (out - reference).abs().max().item()
            del out
            reset()
            peak[name] = peak_extra_bytes(call, device)
        except Exception as err:  # a backend that rejects these inputs: reported, not fatal
            failed[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            del methods[name]
    for _ in range(reps):
        for name, fn in methods.items():
            call, reset = run_pass(fn, inputs, grad_out)
            reset()
            times[name].append(timer(call))
    seconds = {name: statistics.median(t) for name, t in times.items() if t}
    flops = attention_flops(B, H, L, D, mode)
    concat = [s for name, s in seconds.items() if name.startswith("concat_")]
    row = dict(
        L=L,
        B=B,
        H=H,
        Hkv=Hkv,
        D=D,
        mode=mode,
        ms={name: 1e3 * s for name, s in seconds.items()},
        tflops={name: flops / s / 1e12 for name, s in seconds.items()},
        peak_extra_mib={name: (b / 2**20 if b is not None else None) for name, b in peak.items()},
        failed=failed,
        max_abs_diff_vs_sinkdlm=max_abs_diff,
        sinkdlm_sdpa_backend=sdpa_choice(q, k, v),
    )
    if "sinkdlm" in seconds:
        if "sdpa_nosink" in seconds:
            row["speed_vs_sdpa_nosink"] = seconds["sdpa_nosink"] / seconds["sinkdlm"]
        if concat:
            row["speed_vs_best_concat"] = min(concat) / seconds["sinkdlm"]
        if peak.get("sinkdlm") is not None and peak.get("sdpa_nosink"):
            row["peak_vs_sdpa_nosink"] = peak["sinkdlm"] / peak["sdpa_nosink"]
    return row


def sdpa_choice(q, k, v) -> str | None:
    """The fused backend SDPA (and so sinkdlm's composed path) picks for these inputs."""
    if q.device.type != "cuda":
        return None
    choice = torch._fused_sdp_choice(q, k, v, enable_gqa=q.shape[1] != k.shape[1])
    return SDP_CHOICE_NAMES.get(int(choice), str(choice))


def machine_info(device):
    info = dict(torch=torch.__version__, python=platform.python_version(), device=device.type)
    if device.type == "cuda":
        info.update(
            gpu=torch.cuda.get_device_name(device),
            capability=".".join(map(str, torch.cuda.get_device_capability(device))),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        info.update(cpu=cpu_model(), threads=torch.get_num_threads())
    return info


def print_table(rows):
    header = (
        f"{'mode':8} {'D':>4} {'H/Hkv':>6} {'L':>6} {'B':>3} {'sinkdlm':>9} {'nosink':>9} "
        f"{'best cat':>9} {'flex':>9} {'vs nosink':>9} {'vs cat':>7} {'mem':>6}"
    )
    print(header + "   (TFLOP/s; ratios are speed, mem = peak vs nosink)")
    print("-" * len(header))
    for r in rows:
        tf = r["tflops"]
        cat = max((t for n, t in tf.items() if n.startswith("concat_")), default=float("nan"))

        def fmt(x, spec=">9.1f"):
            return format(x, spec) if x is not None else f"{'-':>{spec[1:].split('.')[0]}}"

        print(
            f"{r['mode']:8} {r['D']:>4} {r['H']:>3}/{r['Hkv']:<2} {r['L']:>6} {r['B']:>3} "
            f"{fmt(tf.get('sinkdlm'))} {fmt(tf.get('sdpa_nosink'))} {fmt(cat)} "
            f"{fmt(tf.get('flex'))} {fmt(r.get('speed_vs_sdpa_nosink'), '>9.3f')} "
            f"{fmt(r.get('speed_vs_best_concat'), '>7.3f')} "
            f"{fmt(r.get('peak_vs_sdpa_nosink'), '>6.2f')}"
        )
        for name, err in r["failed"].items():
            print(f"    {name} failed: {err}")
        off = {n: d for n, d in r["max_abs_diff_vs_sinkdlm"].items() if d > DIFF_WARN}
        if off:
            print(f"    outputs differ from sinkdlm's: {off}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--lengths", nargs="+", type=int, default=[512, 1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    ap.add_argument("--heads", nargs="+", default=["32/32", "32/8"], help="H/Hkv pairs (32/8: GQA)")
    ap.add_argument("--tokens", type=int, default=16384, help="B * L per batch")
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compiles)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path")
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="run every code path on the CPU with tiny sizes (checks the script only)",
    )
    args = ap.parse_args(argv)

    if args.dry_run:
        device = torch.device("cpu")
        dtype = torch.float32
        args.lengths, args.head_dims, args.heads = [16, 33], [16], ["4/4", "4/2"]
        args.tokens, args.reps = 66, 1
        out_path = args.out or Path(tempfile.gettempdir()) / "attention_cuda_dryrun.json"
    else:
        if not torch.cuda.is_available():
            print(
                "attention_cuda.py needs a CUDA GPU (torch.cuda.is_available() is False). "
                "Use --dry-run to check the script on the CPU with tiny sizes.",
                file=sys.stderr,
            )
            return 2
        device = torch.device("cuda")
        dtype = getattr(torch, args.dtype)
        out_path = args.out or RESULTS / "attention_cuda.json"

    rows = []
    for mode in args.modes:
        for D in args.head_dims:
            for pair in args.heads:
                H, Hkv = (int(x) for x in pair.split("/"))
                for L in args.lengths:
                    row = bench_config(
                        device,
                        dtype,
                        L,
                        D,
                        H,
                        Hkv,
                        args.tokens,
                        args.reps,
                        mode,
                        flex_mode=None
                        if args.no_flex
                        else ("compiled" if device.type == "cuda" else "eager"),
                    )
                    rows.append(row)
                    print(".", end="", flush=True, file=sys.stderr)
    print(file=sys.stderr)
    print_table(rows)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(
        json.dumps(dict(machine=machine_info(device), dtype=str(dtype), rows=rows), indent=1)
    )
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
