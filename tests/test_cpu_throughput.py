"""benchmarks/cpu_throughput.py: the C microbenchmark compiles, runs on one core and reports a
positive peak for each instruction the CPU has."""

import json

import pytest
from conftest import load_script

from sinkdlm.ops.cpu_paths import cpu_features


@pytest.mark.skipif("avx512f" not in cpu_features(), reason="the microbenchmark needs AVX-512")
def test_reports_each_instruction_the_cpu_has(tmp_path):
    module = load_script("benchmarks/cpu_throughput.py")
    out = tmp_path / "t.json"
    assert module.main(["--iters", "2000000", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["vfmadd231ps_zmm_gflops"] > 1
    assert ("vdpbf16ps_zmm_gflops" in result) == ("avx512_bf16" in cpu_features())
    if "vdpbf16ps_zmm_gflops" in result:
        assert result["vdpbf16ps_zmm_gflops"] > 1
