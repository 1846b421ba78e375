"""Small calls of every sinkdlm CUDA kernel, forward and backward where it has one: the driver that
scripts/device-check.sh runs under compute-sanitizer.

    python scripts/cuda_smoke.py                 every case (needs a GPU)
    python scripts/cuda_smoke.py remask_step     the named cases
    python scripts/cuda_smoke.py --device cpu    the cases' own code, on a machine without a GPU
    python scripts/cuda_smoke.py --list          the case names
    python scripts/cuda_smoke.py --ops           which sinkdlm ops have a CUDA kernel and a case
                                                 (no GPU needed; scripts/cuda-build-check.sh)

Each case builds small random inputs with odd sizes (a ragged last tile, L = 1, GQA, padding,
strided views) on the CPU, runs once on the GPU and once on the CPU, and compares the two. The
comparison is loose on purpose: the tests compare every kernel with a float64 reference; here the
point is that each kernel runs, under the sanitizer, on inputs that reach its edges.

A new kernel's case is a function of the device that returns what it computed (a tensor or a
tuple; gradients too, for a backward), registered with the ops it calls:

    @case("sinkdlm::my_op_fwd", "sinkdlm::my_op_bwd", rtol=1e-4, atol=1e-5)
    def my_op(device):
        x = randn(3, 37, 64).to(device).requires_grad_()
        y = sinkdlm.my_op(x)
        y.backward(randn(*y.shape).to(device))
        return y, x.grad

`--ops` fails when an op has a CUDA kernel but no case, so a kernel cannot miss the sanitizer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import sinkdlm
import sinkdlm.analysis

CASES: dict = {}  # name -> (function, ops, tolerances)


def case(*ops: str, rtol: float = 1e-5, atol: float = 1e-6):
    """Register a smoke case calling ``ops``; floating outputs compare within rtol/atol."""

    def register(fn):
        CASES[fn.__name__] = (fn, ops, dict(rtol=rtol, atol=atol))
        return fn

    return register


_GEN = torch.Generator()


def randn(*shape, dtype=torch.float32) -> torch.Tensor:
    """Fresh normal values from the driver's seeded generator, on the CPU."""
    return torch.randn(*shape, generator=_GEN, dtype=torch.float64).to(dtype)


# ---- cases --------------------------------------------------------------------------------------


@case("sinkdlm::remask_step")
def remask_step(device):
    outs = []
    # B 3, L 37, V 1031: no power of two anywhere. Every strategy, greedy and sampled, a
    # threshold, a window, each logits dtype; row 0 has no masked position.
    settings = [
        ("low_confidence", 0.0, None, False, torch.bfloat16),
        ("margin", 0.7, None, True, torch.float16),
        ("entropy", 0.0, 0.2, False, torch.float32),
        ("random", 0.7, None, True, torch.bfloat16),
    ]
    for strategy, temperature, threshold, use_window, dtype in settings:
        b, n, v = 3, 37, 1031
        mask_id = v - 2
        logits = (randn(b, n, v) * 3).to(dtype)
        x = torch.randint(0, v - 2, (b, n), generator=_GEN)
        x[torch.rand(b, n, generator=_GEN) < 0.6] = mask_id
        x[0] = 7
        num_transfer = torch.tensor([2, 40, 5])
        window = torch.tensor([[0, 37], [3, 20], [36, 37]]) if use_window else None
        outs += sinkdlm.remask_step(
            logits.to(device),
            x.to(device),
            mask_id,
            num_transfer.to(device),
            strategy=strategy,
            temperature=temperature,
            threshold=threshold,
            window=None if window is None else window.to(device),
            generator=torch.Generator().manual_seed(11),
        )
    return tuple(outs)


@case("sinkdlm::attention_mass", rtol=1e-4, atol=1e-6)
def attention_mass(device):
    outs = []
    # GQA 4/2, L 70 with two padded keys in row 1, a shared sink and a logit sink; then MQA with
    # L = 1 and a per-batch sink, float64.
    for b, h, hkv, n, d, per_batch_sink, dtype in [
        (2, 4, 2, 70, 16, False, torch.float32),
        (3, 2, 1, 1, 8, True, torch.float64),
    ]:
        q = randn(b, n, h, d).transpose(1, 2)  # a (B, L, H, D) tensor viewed as (B, H, L, D)
        k, v = randn(b, hkv, n, d), randn(b, hkv, n, d)
        sink_shape = (b, hkv, d) if per_batch_sink else (hkv, d)
        sink_k, sink_v = randn(*sink_shape), randn(*sink_shape)
        sink_logit = randn(h)
        kpm = torch.ones(b, n, dtype=torch.bool)
        kpm[1, n - 2 :] = False
        kw = dict(sink_logit=sink_logit, key_padding_mask=kpm)
        _, lse = sinkdlm.sink_attention(q, k, v, sink_k, sink_v, return_lse=True, **kw)
        moved = [
            t.to(device=device, dtype=dtype) for t in (q, k, lse.masked_fill(~kpm[:, None], 0))
        ]
        outs += sinkdlm.analysis.attention_mass(
            *moved,
            sink_k.to(device=device, dtype=dtype),
            sink_logit=sink_logit.to(device=device, dtype=dtype),
            key_padding_mask=kpm.to(device),
        )
    return tuple(outs)


@case("sinkdlm::sink_attention_fwd", "sinkdlm::sink_attention_bwd", rtol=2e-4, atol=2e-5)
def sink_attention(device):
    outs = []
    # GQA 4/2 with L 37 and padding (row 1 fully padded), both sinks; MQA with L = 1 and a
    # per-batch sink. Gradients through out and lse.
    for b, h, hkv, n, d, per_batch_sink in [(2, 4, 2, 37, 64, False), (1, 2, 1, 1, 16, True)]:
        leaves = [randn(b, h, n, d), randn(b, hkv, n, d), randn(b, hkv, n, d)]
        sink_shape = (b, hkv, d) if per_batch_sink else (hkv, d)
        leaves += [randn(*sink_shape), randn(*sink_shape), randn(h)]
        leaves = [t.to(device).requires_grad_() for t in leaves]
        kpm = torch.ones(b, n, dtype=torch.bool)
        if b > 1:
            kpm[1] = False
        q, k, v, sink_k, sink_v, sink_logit = leaves
        out, lse = sinkdlm.sink_attention(
            q, k, v, sink_k, sink_v, sink_logit=sink_logit, key_padding_mask=kpm.to(device),
            return_lse=True,
        )  # fmt: skip
        grad_out, grad_lse = randn(*out.shape).to(device), randn(*lse.shape).to(device)
        torch.autograd.backward((out, lse), (grad_out, grad_lse))
        outs += [out, lse, *(t.grad for t in leaves)]
    return tuple(outs)


def _composed_case(device, configs):
    """The composed path (ATen's fused attention, the sink merged in: cuda/sink_merge.cu on the
    GPU) forward and backward, gradients through out and lse, on (b, h, hkv, n, d, sink, dtype)."""
    outs = []
    for b, h, hkv, n, d, per_batch_sink, dtype in configs:
        leaves = [randn(b, h, n, d), randn(b, hkv, n, d), randn(b, hkv, n, d)]
        sink_shape = (b, hkv, d) if per_batch_sink else (hkv, d)
        leaves += [randn(*sink_shape), randn(*sink_shape), randn(h)]
        leaves = [t.to(device, dtype).requires_grad_() for t in leaves]
        kpm = torch.ones(b, n, dtype=torch.bool)
        kpm[0, : n // 3] = False  # left padding
        if b > 1:
            kpm[1] = False  # a fully padded row
        q, k, v, sink_k, sink_v, sink_logit = leaves
        out, lse = sinkdlm.sink_attention(
            q, k, v, sink_k, sink_v, sink_logit=sink_logit, key_padding_mask=kpm.to(device),
            return_lse=True, backend="composed",
        )  # fmt: skip
        grad_out, grad_lse = randn(*out.shape).to(device, dtype), randn(*lse.shape).to(device)
        torch.autograd.backward((out, lse), (grad_out, grad_lse))
        outs += [out, lse, *(t.grad for t in leaves)]
        # Without padding or lse gradient: the plain fused backward (flash where it applies).
        for t in leaves:
            t.grad = None
        out = sinkdlm.sink_attention(q, k, v, sink_k, sink_v, backend="composed")
        out.backward(grad_out)
        outs += [out, *(t.grad for t in leaves[:5])]
    return tuple(t.float() for t in outs)


@case("sinkdlm::sink_attention_composed_fwd", "sinkdlm::sink_attention_composed_bwd",
      rtol=2e-2, atol=2e-2)  # fmt: skip
def sink_attention_composed(device):
    # float16 GQA 8/2, L 77, head dim 20 (zero-padded to 24 on the GPU); float32 MQA, L 1.
    return _composed_case(
        device, [(2, 8, 2, 77, 20, False, torch.float16), (1, 4, 1, 1, 64, True, torch.float32)]
    )


@case("sinkdlm::sink_attention_composed_fwd", "sinkdlm::sink_attention_composed_bwd",
      rtol=8e-2, atol=8e-2)  # fmt: skip
def sink_attention_composed_bf16(device):
    # bfloat16, head dim 128, L 130 (a ragged row block in the merge's backward), MHA.
    return _composed_case(device, [(2, 4, 4, 130, 128, False, torch.bfloat16)])


@case("sinkdlm::sink_attention_fwd", "sinkdlm::sink_attention_bwd", rtol=3e-2, atol=3e-2)
def sink_attention_packed(device):
    # Packed rows (segment_ids): flash attention's varlen form on the GPU (bfloat16), the dense
    # bias through the memory-efficient kernel (float32). GQA 4/2, head dim 20 (padded to 24),
    # rows of documents 5, 1, 30, 5 and 41 (padded holes in the first, its last document without
    # a real key); gradients through out and lse.
    return tuple(
        t for dtype in (torch.bfloat16, torch.float32) for t in _packed_case(device, dtype)
    )


def _packed_case(device, dtype):
    b, h, hkv, n, d = 2, 4, 2, 41, 20
    leaves = [randn(b, h, n, d), randn(b, hkv, n, d), randn(b, hkv, n, d)]
    leaves += [randn(hkv, d), randn(hkv, d), randn(h)]
    leaves = [t.to(device, dtype).requires_grad_() for t in leaves]
    lengths = [[5, 1, 30, 5], [41]]
    segment_ids = torch.stack(
        [torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lengths]
    )
    kpm = torch.ones(b, n, dtype=torch.bool)
    kpm[0, 7:9] = False
    kpm[0, 36:] = False  # the last document of row 0 has no real key
    q, k, v, sink_k, sink_v, sink_logit = leaves
    out, lse = sinkdlm.sink_attention(
        q, k, v, sink_k, sink_v, sink_logit=sink_logit, key_padding_mask=kpm.to(device),
        segment_ids=segment_ids.to(device), return_lse=True,
    )  # fmt: skip
    grad_out = randn(*out.shape).to(device, dtype)
    grad_lse = randn(*lse.shape).to(device)
    torch.autograd.backward((out, lse), (grad_out, grad_lse))
    return tuple(t.float() for t in (out, lse, *(t.grad for t in leaves)))


# ---- driver -------------------------------------------------------------------------------------


def run_case(name: str, device: str) -> None:
    fn, _, tol = CASES[name]
    results = []
    for dev in (device, "cpu"):
        _GEN.manual_seed(0)  # the same inputs on both devices
        results.append(fn(dev))
        if dev == "cuda":
            torch.cuda.synchronize()  # a kernel fault surfaces here, inside its case
    got, want = results
    got, want = (got,) if torch.is_tensor(got) else got, (want,) if torch.is_tensor(want) else want
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        exact = not (w.is_floating_point() or w.is_complex())
        torch.testing.assert_close(
            g.cpu(), w, **(dict(rtol=0, atol=0) if exact else tol), msg=lambda m, i=i: f"{i}: {m}"
        )


def op_table() -> list[tuple[str, str, list[str]]]:
    """(op, how CUDA is served, cases calling it) for every sinkdlm op."""
    rows = []
    for op in sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("sinkdlm::")):
        if torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"):
            how = "cuda"
        elif torch._C._dispatch_has_computed_kernel_for_dispatch_key(op, "CUDA"):
            how = "composite"
        else:
            how = "missing"
        rows.append((op, how, [c for c, (_, ops, _) in CASES.items() if op in ops]))
    return rows


def check_ops() -> int:
    """Print the op table; 1 if an op lacks a CUDA kernel (beyond the allowed) or a case."""
    allowed = set(os.environ.get("SINKDLM_CUDA_CHECK_ALLOW_MISSING", "").split())
    rows, problems = op_table(), []
    label = {"cuda": "CUDA kernel", "composite": "composite kernel (serves every device)"}
    print(f"  {'op':38s} {'CUDA':54s} smoke case")
    for op, how, cases in rows:
        text = label.get(how, "MISSING: no CUDA kernel")
        if how == "missing" and op in allowed:
            text = "MISSING (allowed by SINKDLM_CUDA_CHECK_ALLOW_MISSING)"
        elif how == "missing":
            problems.append(f"{op} has no CUDA kernel")
        elif op in allowed:
            problems.append(
                f"{op} has a CUDA kernel now: drop it from SINKDLM_CUDA_CHECK_ALLOW_MISSING"
            )
        if how == "cuda" and not cases:
            problems.append(f"{op} has a CUDA kernel but no case in scripts/cuda_smoke.py")
        print(f"  {op:38s} {text:54s} {', '.join(cases) or '-'}")
    known = {op for op, _, _ in rows}
    if not known:
        problems.append("no sinkdlm ops are registered")
    problems += [
        f"SINKDLM_CUDA_CHECK_ALLOW_MISSING names {op}, which is no op" for op in allowed - known
    ]
    for p in problems:
        print(f"  FAIL: {p}")
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", help="case names (default: all)")
    parser.add_argument("--list", action="store_true", help="print the case names")
    parser.add_argument("--ops", action="store_true", help="op / CUDA kernel / case table")
    parser.add_argument("--json", help="write each case's result here")
    parser.add_argument("--device", default="cuda", help="device compared with the CPU")
    args = parser.parse_args()
    if args.list:
        print("\n".join(CASES))
        return 0
    if args.ops:
        return check_ops()
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; cases: {list(CASES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("cuda_smoke: no CUDA device visible to torch", file=sys.stderr)
        return 1
    results = {}
    for name in args.cases or list(CASES):
        start = time.perf_counter()
        try:
            run_case(name, args.device)
            status, error = "pass", None
        except Exception as e:  # one broken kernel must not hide the others
            status, error = "fail", f"{type(e).__name__}: {e}"
        seconds = time.perf_counter() - start
        results[name] = dict(status=status, seconds=round(seconds, 2), error=error)
        detail = "" if error is None else f": {error}"
        print(f"cuda_smoke: {name}: {status} ({seconds:.1f} s){detail}")
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0 if all(r["status"] == "pass" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
