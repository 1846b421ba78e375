"""The CPU path rules: which backend ``sink_attention(backend="auto")`` takes per CPU family and
dtype (ops/cpu_paths.py), tested by forcing the CPU's features; and every CPU path the build has
(native with each bf16 GEMM engine, composed) against the float64 reference, each engine forced
through SINKDLM_CPU_BF16_GEMM in a fresh process (the ops read it once)."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_sink_attention import NAMES, assert_close_all, make_inputs, run_both

import sinkdlm

cpu_paths = importlib.import_module("sinkdlm.ops.cpu_paths")
HERE = Path(__file__).resolve().parent

AMD_ZEN4 = frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"})
INTEL_NO_AMX = AMD_ZEN4 | {"avx512_fp16"}
INTEL_AMX = INTEL_NO_AMX | {"amx_tile", "amx_bf16"}
INTEL_AMX_FP16 = INTEL_AMX | {"amx_fp16"}
AVX2_ONLY = frozenset({"avx2", "fma"})


@pytest.mark.parametrize(
    ("features", "dtype", "want"),
    [
        (AMD_ZEN4, torch.bfloat16, "native"),
        (INTEL_NO_AMX, torch.bfloat16, "native"),
        (INTEL_AMX, torch.bfloat16, "composed"),
        (AVX2_ONLY, torch.bfloat16, "native"),
        (INTEL_AMX_FP16, torch.float16, "composed"),
        (INTEL_AMX, torch.float16, "composed"),
        (INTEL_NO_AMX, torch.float16, "composed"),
        (AMD_ZEN4, torch.float16, "native"),
        (AVX2_ONLY, torch.float16, "native"),
        (INTEL_AMX_FP16, torch.float32, "native"),
        (AMD_ZEN4, torch.float32, "native"),
        (INTEL_AMX_FP16, torch.float64, "native"),
    ],
)
def test_auto_rule_per_cpu_family(features, dtype, want):
    assert cpu_paths.cpu_auto_backend(features, dtype) == want


@pytest.mark.parametrize(
    ("features", "dtype", "want"),
    [
        (INTEL_NO_AMX, torch.float16, "native"),
        (INTEL_AMX_FP16, torch.float16, "composed"),
        (INTEL_AMX, torch.bfloat16, "composed"),
        (AMD_ZEN4, torch.bfloat16, "native"),
    ],
)
def test_auto_rule_with_a_backward(features, dtype, want):
    assert cpu_paths.cpu_auto_backend(features, dtype, needs_grad=True) == want


NATIVE, COMPOSED = "sinkdlm::sink_attention_fwd", "sinkdlm::sink_attention_composed_fwd"


def _sink_ops_run(fn):
    """Which of the two sink-attention forward ops ``fn`` dispatched to."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.key for event in prof.key_averages()} & {NATIVE, COMPOSED}


@pytest.mark.parametrize("requires_grad", [False, True])
def test_auto_float16_on_avx512_fp16_follows_the_gradient(requires_grad, monkeypatch):
    monkeypatch.setattr(cpu_paths, "CPU_FEATURES", INTEL_NO_AMX)
    q, k, v, sk, sv, _, _ = make_inputs(1, 2, 2, 17, 16, "shared", False, torch.float16)
    q = q.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(requires_grad)
    assert _sink_ops_run(lambda: sinkdlm.sink_attention(q, k, v, sk, sv)) == {
        NATIVE if requires_grad else COMPOSED
    }


AMD_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
stepping\t: 1
flags\t\t: fpu avx2 avx512f avx512_bf16

processor\t: 1
model name\t: another name, not read
"""


def test_cpu_model_names_family_model_and_stepping(tmp_path, monkeypatch):
    # A virtual machine's "AMD EPYC" covers several generations: the numbers tell them apart.
    (tmp_path / "cpuinfo").write_text(AMD_CPUINFO)
    monkeypatch.setattr(cpu_paths, "CPUINFO", tmp_path / "cpuinfo")
    assert cpu_paths.cpu_model() == "AMD EPYC (cpu family 25, model 17, stepping 1)"
    assert cpu_paths.cpu_vendor() == "amd"
    assert cpu_paths.cpu_features() == {"avx2", "avx512f", "avx512_bf16"}
    monkeypatch.setattr(cpu_paths, "CPUINFO", tmp_path / "absent")
    assert cpu_paths.cpu_model()  # Python's name for the processor instead


def test_features_are_known_flags():
    assert cpu_paths.CPU_FEATURES <= frozenset(cpu_paths.CPU_FLAGS)
    assert cpu_paths.CPU_FEATURES == cpu_paths.cpu_features()


@pytest.mark.parametrize("features", [INTEL_AMX, AMD_ZEN4], ids=["amx", "zen4"])
def test_auto_follows_the_rule(features, monkeypatch):
    """auto runs the path the rule names for the forced CPU, and it matches the reference."""
    monkeypatch.setattr(cpu_paths, "CPU_FEATURES", features)
    q, k, v, sk, sv, _, _ = make_inputs(2, 4, 2, 33, 16, "shared", False, torch.bfloat16)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    outs = []
    ran = _sink_ops_run(lambda: outs.append(sinkdlm.sink_attention(q, k, v, sk, sv)))
    composed = cpu_paths.cpu_auto_backend(features, torch.bfloat16) == "composed"
    assert ran == {COMPOSED if composed else NATIVE}
    out = outs[0]
    want = sinkdlm.sink_attention_reference(*(t.double() for t in (q, k, v, sk, sv)))
    torch.testing.assert_close(out.double(), want.double(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("backend", ["native", "composed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_each_cpu_path_matches_reference(backend, dtype):
    inputs = make_inputs(2, 4, 2, 67, 64, "per_batch", True, dtype=dtype)
    (out, lse, ours), (r_out, r_lse, ref) = run_both(*inputs, backend=backend)
    grads = [t.grad if t is not None else None for t in ours]
    r_grads = [t.grad if t is not None else None for t in ref]
    assert_close_all([out, lse, *grads], [r_out, r_lse, *r_grads], dtype, NAMES)


CHILD = """
import json, sys, torch
sys.path.insert(0, {here!r})
import sinkdlm
from test_sink_attention import NAMES, assert_close_all, make_inputs, run_both
for shape in [(2, 4, 2, 67, 64), (1, 2, 1, 1, 40), (3, 4, 4, 130, 128)]:
    inputs = make_inputs(*shape, "shared+logit", True, dtype=torch.bfloat16)
    (out, lse, ours), (r_out, r_lse, ref) = run_both(*inputs, backend="native")
    grads = [t.grad if t is not None else None for t in ours]
    r_grads = [t.grad if t is not None else None for t in ref]
    assert_close_all([out, lse, *grads], [r_out, r_lse, *r_grads], torch.bfloat16, NAMES)
print(json.dumps(sinkdlm._C.cpu_bf16_gemm()))
"""


def run_child(gemm):
    env = dict(os.environ, SINKDLM_CPU_BF16_GEMM=gemm)
    return subprocess.run(
        [sys.executable, "-c", CHILD.format(here=str(HERE))],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize("gemm", ["avx512_bf16", "fp32", "portable"])
def test_native_bf16_with_each_gemm_engine_matches_reference(gemm):
    if gemm == "avx512_bf16" and "avx512_bf16" not in cpu_paths.CPU_FEATURES:
        pytest.skip("this CPU lacks avx512_bf16: the vdpbf16ps kernels cannot run")
    child = run_child(gemm)
    assert child.returncode == 0, child.stderr[-3000:]
    assert json.loads(child.stdout.strip().splitlines()[-1]) == gemm


def test_unknown_bf16_gemm_engine_is_refused_clearly():
    child = run_child("amx")
    assert child.returncode != 0
    assert "SINKDLM_CPU_BF16_GEMM must be auto, avx512_bf16, fp32 or portable" in child.stderr


def test_this_cpu_bf16_engine_follows_the_rule():
    """Unforced, the native kernel runs vdpbf16ps on AMD CPUs with avx512_bf16 only."""
    if os.environ.get("SINKDLM_CPU_BF16_GEMM", "auto") not in ("", "auto"):
        pytest.skip("SINKDLM_CPU_BF16_GEMM forces the engine in this process")
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to read the vendor from")
    amd = "AuthenticAMD" in cpuinfo.read_text()
    fast = amd and "avx512_bf16" in cpu_paths.CPU_FEATURES
    assert sinkdlm._C.cpu_bf16_gemm() == ("avx512_bf16" if fast else "fp32")
