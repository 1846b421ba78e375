"""sinkdlm.ops.common: the dispatcher question that routes every op, and the shared rules."""

import pytest
import torch

import sinkdlm
from sinkdlm.ops.common import accumulation_dtype, expand_sink, has_native_kernel, softmax_scale


def test_has_native_kernel_reports_what_is_registered():
    """A throwaway op with a CPU kernel only; then a second one that also has a fake."""
    lib = torch.library.Library("sinkdlm_dispatch_test", "DEF")
    lib.define("cpu_only(Tensor x) -> Tensor")
    lib.define("cpu_and_fake(Tensor x) -> Tensor")
    lib.impl("cpu_only", lambda x: x.clone(), "CPU")
    lib.impl("cpu_and_fake", lambda x: x.clone(), "CPU")
    torch.library.register_fake(
        "sinkdlm_dispatch_test::cpu_and_fake", lambda x: x.new_empty(x.shape), lib=lib
    )
    assert has_native_kernel("sinkdlm_dispatch_test::cpu_only", "cpu")
    assert not has_native_kernel("sinkdlm_dispatch_test::cpu_only", "cuda")
    assert not has_native_kernel("sinkdlm_dispatch_test::cpu_only", "meta")
    assert has_native_kernel("sinkdlm_dispatch_test::cpu_and_fake", "meta")
    assert not has_native_kernel("sinkdlm_dispatch_test::cpu_and_fake", "mps")


@pytest.mark.parametrize(
    "op", ["sinkdlm::sink_attention_fwd", "sinkdlm::remask_step", "sinkdlm::attention_mass"]
)
def test_every_op_has_its_cpu_and_meta_kernels(op):
    assert has_native_kernel(op, "cpu") and has_native_kernel(op, "meta")


@pytest.mark.parametrize("op", ["sinkdlm::remask_step", "sinkdlm::attention_mass"])
def test_cuda_kernels_exist_exactly_when_linked(op):
    assert has_native_kernel(op, "cuda") == sinkdlm._C.build_info()["cuda_linked"]


def test_has_native_kernel_is_a_constant_to_torch_compile():
    def route(x):
        return x * 2 if has_native_kernel("sinkdlm::remask_step", x.device.type) else x * 3

    compiled = torch.compile(route, fullgraph=True, backend="eager")
    assert torch.equal(compiled(torch.ones(3)), torch.full((3,), 2.0))


def test_shared_rules():
    assert softmax_scale(None, 64) == 0.125 and softmax_scale(2, 64) == 2.0
    assert accumulation_dtype(torch.float64) == torch.float64
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert accumulation_dtype(dtype) == torch.float32
    shared, per_batch = torch.randn(2, 8), torch.randn(3, 2, 8)
    assert torch.equal(expand_sink(shared, 3), shared.expand(3, 2, 8))
    assert expand_sink(per_batch, 3) is per_batch
