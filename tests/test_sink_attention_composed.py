"""The composed sink attention: ATen's fused attention over the keys, the sink merged in through
the log-sum-exp. Its C++ op (CPU here, CUDA on a GPU) and its plain-PyTorch form (devices without
sinkdlm's kernels), against the float64 reference on the CPU."""

import importlib

import pytest
import torch
from conftest import cuda_native
from test_sink_attention import (
    NAMES,
    SHAPES,
    SINKS,
    assert_close_all,
    make_inputs,
    opcheck_cases,
    run_both,
)

import sinkdlm

composite = importlib.import_module("sinkdlm.ops.sink_attention_composite")

sink_attention_module = importlib.import_module("sinkdlm.ops.sink_attention")

needs_gpu = pytest.mark.skipif(
    not cuda_native(), reason="needs a GPU and sinkdlm built against a CUDA torch"
)


def check(inputs, dtype, backend, scale=None, with_lse=True):
    (out, lse, ours), (r_out, r_lse, ref) = run_both(
        *inputs, scale=scale, backend=backend, with_lse=with_lse
    )
    q = inputs[0]
    assert out.dtype == q.dtype and out.shape == q.shape
    if backend == "composed" or q.device.type != "cpu":  # not the native kernel's contiguous out
        assert has_layout_of(out, q)
    grads = [t.grad if t is not None else None for t in ours]
    r_grads = [t.grad if t is not None else None for t in ref]
    assert_close_all([out, lse, *grads], [r_out, r_lse, *r_grads], dtype, NAMES)
    return out


def has_layout_of(out, q):
    """The composed path's promise (and its fake's): out laid out like torch.empty_like(q)."""
    return out.stride() == torch.empty_like(q).stride()


def check_fully_padded_batch(B, H, Hkv, L, D, sink, backend, dtype=torch.float64):
    """Batch 0 entirely padded: its outputs and gradients are exactly 0, and the other batches
    (and a shared sink's gradients, which batch 0 adds nothing to) match the reference run on
    them alone. (The reference itself has nan gradients there when no sink is visible.)"""
    q, k, v, sk, sv, lam, kpm = make_inputs(B, H, Hkv, L, D, sink, True, dtype=dtype)
    kpm[0] = False
    ours = [t.clone().requires_grad_() if t is not None else None for t in (q, k, v, sk, sv, lam)]
    out, lse = sinkdlm.sink_attention(
        *ours[:5], sink_logit=ours[5], key_padding_mask=kpm, return_lse=True, backend=backend
    )
    g = torch.Generator().manual_seed(1)
    d_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    d_lse = torch.randn(lse.shape, generator=g, dtype=torch.float64)
    ((out.double() * d_out).sum() + (lse.double() * d_lse).sum()).backward()
    per_batch = [
        True,
        True,
        True,
        sk is not None and sk.dim() == 3,
        sk is not None and sk.dim() == 3,
    ]
    assert (out[0] == 0).all() and (lse[0] == 0).all()
    for t, batched in zip(ours[:5], per_batch, strict=True):
        if t is not None and batched:
            assert (t.grad[0] == 0).all()

    def rest(t, batched):
        return t[1:] if t is not None and batched else t

    ref = [
        rest(t, b).detach().double().requires_grad_() if t is not None else None
        for t, b in zip((q, k, v, sk, sv, lam), [*per_batch, False], strict=True)
    ]
    r_out, r_lse = sinkdlm.sink_attention_reference(
        *ref[:5], sink_logit=ref[5], key_padding_mask=kpm[1:], return_lse=True
    )
    ((r_out * d_out[1:]).sum() + (r_lse * d_lse[1:]).sum()).backward()
    got = [out[1:], lse[1:]] + [
        rest(t.grad, b) if t is not None else None
        for t, b in zip(ours, [*per_batch, False], strict=True)
    ]
    want = [r_out, r_lse] + [t.grad if t is not None else None for t in ref]
    assert_close_all(got, want, dtype, NAMES)


# ---- the C++ composed op on the CPU, the whole grid ----------------------------------------


@pytest.mark.parametrize("padding", ["nopad", "pad", "allpad"])
@pytest.mark.parametrize("sink", SINKS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}Hkv{}L{}D{}".format(*s))
def test_composed_matches_reference_float64(shape, sink, padding):
    if padding == "allpad":
        check_fully_padded_batch(*shape, sink, "composed")
        return
    inputs = make_inputs(*shape, sink, padding == "pad")
    out = check(inputs, torch.float64, "composed")
    assert has_layout_of(out, inputs[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sink", ["per_batch", "shared+logit"])
def test_composed_low_precision(dtype, sink):
    check(make_inputs(2, 8, 2, 129, 64, sink, True, dtype=dtype), dtype, "composed")


@pytest.mark.parametrize("layout", ["bhld_transposed", "strided_last_dim", "sliced"])
def test_composed_non_contiguous_inputs(layout):
    q, k, v, sk, sv, lam, kpm = make_inputs(2, 4, 2, 70, 32, "shared+logit", True)
    L = q.shape[2]

    def view(x):
        if layout == "bhld_transposed":
            return x.transpose(1, 2).contiguous().transpose(1, 2)
        if layout == "strided_last_dim":
            return torch.stack([x, torch.full_like(x, float("nan"))], dim=-1)[..., 0]
        return torch.cat([x, torch.full_like(x, float("nan"))], dim=2)[:, :, :L]

    check((view(q), view(k), view(v), sk, sv, lam, kpm), torch.float64, "composed", scale=0.3)


def test_composed_gradient_through_lse_alone():
    """Only lse in the loss: the fused backward's dO is zero, its dlse column carries it all."""
    q, k, v, sk, sv, lam, kpm = make_inputs(2, 4, 2, 9, 16, "shared+logit", True)
    grads = {}
    for backend in ("composed", "native"):
        ins = [t.clone().requires_grad_() for t in (q, k, v, sk, sv, lam)]
        _, lse = sinkdlm.sink_attention(
            *ins[:5], sink_logit=ins[5], key_padding_mask=kpm, return_lse=True, backend=backend
        )
        weights = torch.arange(lse.numel(), dtype=lse.dtype).view_as(lse)
        grads[backend] = torch.autograd.grad((lse * weights).sum(), ins)
    for a, b in zip(grads["composed"], grads["native"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_composed_gradcheck():
    q, k, v, sk, sv, lam, kpm = make_inputs(2, 4, 2, 6, 8, "shared+logit", True)
    ins = [t.requires_grad_() for t in (q, k, v, sk, sv, lam)]

    def f(q, k, v, sk, sv, lam):
        return sinkdlm.sink_attention(
            q,
            k,
            v,
            sk,
            sv,
            sink_logit=lam,
            key_padding_mask=kpm,
            return_lse=True,
            backend="composed",
        )

    assert torch.autograd.gradcheck(f, ins, eps=1e-6, atol=1e-7)


def test_composed_backward_is_deterministic():
    q, k, v, sk, sv, lam, kpm = make_inputs(3, 8, 2, 200, 32, "shared+logit", True, torch.float32)
    runs = []
    for _ in range(2):
        ins = [t.clone().requires_grad_() for t in (q, k, v, sk, sv, lam)]
        out = sinkdlm.sink_attention(
            *ins[:5], sink_logit=ins[5], key_padding_mask=kpm, backend="composed"
        )
        runs.append(torch.autograd.grad((out * out).sum(), ins))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", range(3))
def test_composed_opcheck(case):
    (q, k, v, sk, sv, lam, kpm), scale = list(opcheck_cases())[case]
    args = [
        t.requires_grad_() if t is not None and t.is_floating_point() else t
        for t in (q, k, v, sk, sv, lam)
    ]
    torch.library.opcheck(
        torch.ops.sinkdlm.sink_attention_composed_fwd.default, (*args, kpm, None, scale)
    )


def test_composed_torch_compile_fullgraph():
    q, k, v, sk, sv, lam, kpm = make_inputs(2, 4, 2, 17, 16, "shared+logit", True, torch.float32)
    ins = [t.requires_grad_() for t in (q, k, v, sk, sv, lam)]

    def loss(q, k, v, sk, sv, lam):
        out, lse = sinkdlm.sink_attention(
            q,
            k,
            v,
            sk,
            sv,
            sink_logit=lam,
            key_padding_mask=kpm,
            return_lse=True,
            backend="composed",
        )
        return (out * out).sum() + lse.sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    for a, b in zip(
        torch.autograd.grad(compiled(*ins), ins), torch.autograd.grad(loss(*ins), ins), strict=True
    ):
        torch.testing.assert_close(a, b)


# ---- the plain-PyTorch composite (devices without sinkdlm's kernels) -----------------------

COMPOSITE_SHAPES = [(2, 4, 4, 37, 16), (3, 8, 2, 300, 24), (1, 4, 1, 1, 8), (2, 2, 1, 64, 20)]


@pytest.fixture(params=["cpu_flash", "blocked"])
def composite_kind(request, monkeypatch):
    """The composite on the CPU, through the CPU's fused kernel or the blocked plain-torch form
    (what MPS, XPU and float64 on CUDA run)."""
    monkeypatch.setattr(composite, "_attention_kind", lambda q: request.param)
    monkeypatch.setattr(sink_attention_module, "has_native_kernel", lambda op, device: False)
    return request.param


@pytest.mark.parametrize("padding", ["nopad", "pad", "allpad"])
@pytest.mark.parametrize("sink", SINKS)
@pytest.mark.parametrize("shape", COMPOSITE_SHAPES, ids=lambda s: "B{}H{}Hkv{}L{}D{}".format(*s))
def test_composite_matches_reference(composite_kind, shape, sink, padding):
    if padding == "allpad":
        check_fully_padded_batch(*shape, sink, "auto")
        return
    check(make_inputs(*shape, sink, padding == "pad"), torch.float64, "auto")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_composite_low_precision(composite_kind, dtype):
    check(make_inputs(2, 8, 2, 129, 64, "shared+logit", True, dtype=dtype), dtype, "auto")


def test_composite_blocks_never_hold_l_by_l(monkeypatch):
    """The blocked form holds block x L scores: force a small block and check it still agrees."""
    monkeypatch.setattr(composite, "_attention_kind", lambda q: "blocked")
    monkeypatch.setattr(composite, "QUERY_BLOCK", 5)
    monkeypatch.setattr(sink_attention_module, "has_native_kernel", lambda op, device: False)
    check(make_inputs(2, 4, 2, 23, 8, "per_batch", True), torch.float64, "auto")


def test_composite_gradcheck(composite_kind):
    q, k, v, sk, sv, lam, kpm = make_inputs(2, 4, 2, 6, 8, "shared+logit", True)
    ins = [t.requires_grad_() for t in (q, k, v, sk, sv, lam)]

    def f(q, k, v, sk, sv, lam):
        return sinkdlm.sink_attention(
            q, k, v, sk, sv, sink_logit=lam, key_padding_mask=kpm, return_lse=True
        )

    assert torch.autograd.gradcheck(f, ins, eps=1e-6, atol=1e-7)


# ---- which path runs -----------------------------------------------------------------------


def test_device_without_a_kernel_takes_the_composite(monkeypatch):
    """The dispatch rule: no kernel for the device (stubbed query) -> the composite runs, and
    neither op is called."""
    calls = []
    monkeypatch.setattr(sink_attention_module, "has_native_kernel", lambda op, device: False)
    real = composite.sink_attention_composite
    monkeypatch.setattr(
        sink_attention_module,
        "sink_attention_composite",
        lambda *a: calls.append("composite") or real(*a),
    )
    q, k, v, sk, sv, lam, kpm = make_inputs(2, 4, 2, 9, 16, "shared", True)
    for backend in ("auto", "composed"):
        out = sinkdlm.sink_attention(q, k, v, sk, sv, key_padding_mask=kpm, backend=backend)
        want = sinkdlm.sink_attention_reference(q, k, v, sk, sv, key_padding_mask=kpm)
        torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)
    assert calls == ["composite", "composite"]
    with pytest.raises(ValueError, match="backend='native'"):
        sinkdlm.sink_attention(q, k, v, sk, sv, backend="native")


def test_dispatcher_knows_the_kernels():
    has = sink_attention_module.has_native_kernel
    assert has("sinkdlm::sink_attention_fwd", "cpu")
    assert has("sinkdlm::sink_attention_composed_fwd", "cpu")
    assert has("sinkdlm::sink_attention_fwd", "meta")  # the fake kernel
    linked = sinkdlm._C.build_info()["cuda_linked"]
    assert has("sinkdlm::sink_attention_fwd", "cuda") == linked
    assert has("sinkdlm::sink_attention_composed_fwd", "cuda") == linked


@pytest.mark.parametrize("backend", ["auto", "native", "composed"])
def test_meta_tensors_get_shapes_and_layout(backend):
    q, k, v = (torch.empty(2, 4, 5, 8, device="meta") for _ in range(3))
    out, lse = sinkdlm.sink_attention(q, k, v, return_lse=True, backend=backend)
    assert out.shape == (2, 4, 5, 8) and lse.shape == (2, 4, 5) and lse.dtype == torch.float32


def test_layouts_of_the_two_cpu_paths():
    """Both paths give out q's layout, e.g. (B, L, H, D)-major for a projection viewed as heads,
    so that the transpose back to (B, L, H * D) is free (the composed merge runs in place)."""
    q, k, v, sk, sv, _, _ = make_inputs(2, 4, 2, 9, 16, "shared", False, torch.float32)
    q_blhd = q.transpose(1, 2).contiguous().transpose(1, 2)
    for x in (q, q_blhd):
        for backend in ("native", "composed"):
            out = sinkdlm.sink_attention(x, k, v, sk, sv, backend=backend)
            assert has_layout_of(out, x)
            torch.testing.assert_close(out, sinkdlm.sink_attention(q, k, v, sk, sv))
    assert not out.is_contiguous()


def test_bad_backend_raises_clearly():
    q, k, v, *_ = make_inputs(1, 2, 2, 3, 8, "none", False)
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'native', 'composed'"):
        sinkdlm.sink_attention(q, k, v, backend="flash")


def test_composed_op_called_directly_checks_too():
    q, k, v, *_ = make_inputs(2, 4, 2, 5, 8, "none", False, torch.float32)
    with pytest.raises(RuntimeError, match="sink_k/sink_v must be"):
        torch.ops.sinkdlm.sink_attention_composed_fwd(
            q, k, v, torch.randn(3, 8), torch.randn(3, 8), None, None, None, 1.0
        )
    with pytest.raises(RuntimeError, match="H % Hkv == 0"):
        torch.ops.sinkdlm.sink_attention_composed_fwd(
            q, torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8), None, None, None, None, None, 1.0
        )


# ---- CUDA: against the CPU float64 reference -----------------------------------------------

CUDA_SHAPES = [(2, 8, 2, 129, 64), (1, 4, 4, 1, 128), (3, 4, 1, 300, 80), (2, 4, 2, 77, 20)]


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "B{}H{}Hkv{}L{}D{}".format(*s))
@pytest.mark.parametrize("sink", ["none", "per_batch", "shared+logit"])
@pytest.mark.parametrize("padding", [False, True], ids=["nopad", "pad"])
def test_cuda_matches_cpu_reference(dtype, shape, sink, padding):
    check(make_inputs(*shape, sink, padding, dtype=dtype, device="cuda"), dtype, "auto")


@needs_gpu
@pytest.mark.parametrize(
    "sdpa_backend", ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"]
)
@pytest.mark.parametrize("padding", [False, True], ids=["nopad", "pad"])
def test_cuda_each_fused_backend(sdpa_backend, padding):
    """sdpa_kernel steers the composed path's backend; each one must give the same numbers."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    inputs = make_inputs(2, 8, 2, 129, 64, "shared+logit", padding, torch.bfloat16, "cuda")
    with sdpa_kernel([getattr(SDPBackend, sdpa_backend)]):
        try:
            check(inputs, torch.bfloat16, "auto")
        except RuntimeError as err:
            if "no fused attention kernel" in str(err):
                pytest.skip(f"{sdpa_backend} takes none of these inputs on this GPU: {err}")
            raise


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_cuda_composite_matches_cpu_reference(dtype, monkeypatch):
    """The plain-torch composite on a GPU (a CUDA torch without sinkdlm's CUDA build): the
    memory-efficient kernel, or the blocked form for float64."""
    monkeypatch.setattr(sink_attention_module, "has_native_kernel", lambda op, device: False)
    for shape in [(2, 8, 2, 129, 64), (2, 4, 1, 77, 20)]:
        check(make_inputs(*shape, "shared+logit", True, dtype=dtype, device="cuda"), dtype, "auto")


@needs_gpu
def test_cuda_float64_runs_the_composite():
    check(make_inputs(2, 4, 2, 33, 16, "shared+logit", True, device="cuda"), torch.float64, "auto")
    q, k, v, *_ = make_inputs(1, 2, 2, 3, 8, "none", False, device="cuda")
    with pytest.raises(TypeError, match="float64"):
        torch.ops.sinkdlm.sink_attention_fwd(q, k, v, None, None, None, None, None, 1.0)


@needs_gpu
def test_cuda_non_contiguous_and_deterministic():
    q, k, v, sk, sv, lam, kpm = make_inputs(
        2, 8, 2, 200, 64, "shared+logit", True, torch.bfloat16, "cuda"
    )
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    check((q, k, v, sk, sv, lam, kpm), torch.bfloat16, "auto")
    runs = []
    for _ in range(2):
        ins = [t.detach().clone().requires_grad_() for t in (q, k, v, sk, sv, lam)]
        out = sinkdlm.sink_attention(*ins[:5], sink_logit=ins[5], key_padding_mask=kpm)
        runs.append(torch.autograd.grad(out.float().square().sum(), ins[3:]))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)  # the sink gradients: fixed-order sums


@needs_gpu
def test_cuda_opcheck():
    inputs = make_inputs(2, 4, 2, 9, 64, "shared+logit", True, torch.bfloat16, "cuda")
    args = [
        t.requires_grad_() if t is not None and t.is_floating_point() else t for t in inputs[:6]
    ]
    torch.library.opcheck(
        torch.ops.sinkdlm.sink_attention_fwd.default, (*args, inputs[6], None, 0.125)
    )
