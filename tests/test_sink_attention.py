"""sinkdlm.sink_attention against the paper's literal form (sink_attention_reference)."""

import importlib
import itertools

import numpy as np
import pytest
import torch
from conftest import devices

import sinkdlm
from sinkdlm.ops.sink_attention_composite import sink_attention_composite

sink_attention_module = importlib.import_module("sinkdlm.ops.sink_attention")

# CUDA runs the composed kernel where sinkdlm links it, the plain-torch composite elsewhere: a
# GPU is enough.
DEVICES = devices(native_cuda=False)
needs = pytest.mark.parametrize("device", DEVICES)

# (B, H, Hkv) cycles through batch sizes 1-3 and head layouts MHA 1/1, 4/4, GQA 8/2, MQA 4/1,
# so every L x D pair meets a different combination.
LENGTHS = [1, 7, 64, 129, 300]
HEAD_DIMS = [16, 64, 80, 128]
HEADS = [(1, 1, 1), (2, 4, 4), (3, 8, 2), (1, 4, 1)]
SHAPES = [
    (*HEADS[i % len(HEADS)], L, D) for i, (L, D) in enumerate(itertools.product(LENGTHS, HEAD_DIMS))
]
SINKS = ["none", "shared", "per_batch", "logit", "shared+logit"]

TOL = {  # (atol, rtol) against the float64 reference, inputs rounded to the dtype first
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


def make_inputs(B, H, Hkv, L, D, sink, padding, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype)

    q, k, v = randn(B, H, L, D), randn(B, Hkv, L, D), randn(B, Hkv, L, D)
    sink_k = sink_v = sink_logit = kpm = None
    if sink in ("shared", "shared+logit"):
        sink_k, sink_v = randn(Hkv, D), randn(Hkv, D)
    elif sink == "per_batch":
        sink_k, sink_v = randn(B, Hkv, D), randn(B, Hkv, D)
    if "logit" in sink:
        sink_logit = randn(H) + 1.0
    if padding:
        lengths = torch.randint(1, L + 1, (B,), generator=g)
        kpm = (torch.arange(L)[None, :] < lengths[:, None]).flip(-1).to(device)  # left padding
    return q, k, v, sink_k, sink_v, sink_logit, kpm


def run_both(q, k, v, sink_k, sink_v, sink_logit, kpm, scale=None, backend="auto", with_lse=True):
    """Forward + backward through sink_attention and the float64 reference on the CPU, with the
    same cotangents (on out, and on lse unless ``with_lse`` is False)."""
    tensors = [q, k, v, sink_k, sink_v, sink_logit]
    ours = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    ref = [t.detach().cpu().double().requires_grad_() if t is not None else None for t in tensors]
    out, lse = sinkdlm.sink_attention(
        *ours[:5],
        sink_logit=ours[5],
        key_padding_mask=kpm,
        scale=scale,
        return_lse=True,
        backend=backend,
    )
    r_out, r_lse = sinkdlm.sink_attention_reference(
        *ref[:5],
        sink_logit=ref[5],
        key_padding_mask=kpm.cpu() if kpm is not None else None,
        scale=scale,
        return_lse=True,
        sink_position=q.shape[2] // 2,
    )
    g = torch.Generator().manual_seed(1)
    d_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    d_lse = torch.randn(lse.shape, generator=g, dtype=torch.float64) * with_lse
    loss = (out.double() * d_out.to(out.device)).sum()
    r_loss = (r_out * d_out).sum()
    if with_lse:
        loss = loss + (lse.double() * d_lse.to(out.device)).sum()
        r_loss = r_loss + (r_lse * d_lse).sum()
    loss.backward()
    r_loss.backward()
    return (out, lse, ours), (r_out, r_lse, ref)


def assert_close_all(got, want, dtype, names):
    atol, rtol = TOL[dtype]
    for name, a, b in zip(names, got, want, strict=True):
        if b is None:
            assert a is None, name
            continue
        assert a is not None, name
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        torch.testing.assert_close(
            a.double().cpu(),
            b.double().cpu(),
            atol=atol,
            rtol=rtol,
            msg=lambda m, n=name: f"{n}: {m}",
        )


NAMES = ["out", "lse", "dq", "dk", "dv", "dsink_k", "dsink_v", "dsink_logit"]


def check(q, k, v, sink_k, sink_v, sink_logit, kpm, dtype, scale=None):
    (out, lse, ours), (r_out, r_lse, ref) = run_both(
        q, k, v, sink_k, sink_v, sink_logit, kpm, scale
    )
    assert out.dtype == q.dtype and out.shape == q.shape and out.stride(-1) == 1
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    grads = [t.grad if t is not None else None for t in ours]
    r_grads = [t.grad if t is not None else None for t in ref]
    assert_close_all([out, lse, *grads], [r_out, r_lse, *r_grads], dtype, NAMES)


@pytest.mark.parametrize("padding", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("sink", SINKS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}Hkv{}L{}D{}".format(*s))
def test_matches_reference_float64(shape, sink, padding):
    check(*make_inputs(*shape, sink, padding), torch.float64)


@needs
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:]
)
@pytest.mark.parametrize(
    "shape",
    [(2, 4, 2, 129, 64), (1, 2, 1, 7, 80), (3, 8, 8, 64, 128)],
    ids=lambda s: "B{}H{}Hkv{}L{}D{}".format(*s),
)
@pytest.mark.parametrize("sink", ["per_batch", "shared+logit"])
def test_low_precision(device, dtype, shape, sink):
    check(*make_inputs(*shape, sink, True, dtype=dtype, device=device), dtype)


@needs
@pytest.mark.parametrize("layout", ["bhld_transposed", "strided_last_dim", "sliced"])
def test_non_contiguous_inputs(device, layout):
    B, H, Hkv, L, D = 2, 4, 2, 70, 32
    q, k, v, sk, sv, lam, kpm = make_inputs(B, H, Hkv, L, D, "shared+logit", True, device=device)

    def view(x):
        if layout == "bhld_transposed":  # what Hugging Face hands over: (B, L, H, D).transpose
            return x.transpose(1, 2).contiguous().transpose(1, 2)
        if layout == "strided_last_dim":  # unit stride nowhere
            return torch.stack([x, torch.full_like(x, float("nan"))], dim=-1)[..., 0]
        return torch.cat([x, torch.full_like(x, float("nan"))], dim=2)[:, :, :L]

    q, k, v = view(q), view(k), view(v)
    assert not q.is_contiguous()
    check(q, k, v, sk, sv, lam, kpm, torch.float64, scale=0.3)


def test_position_of_the_sink_does_not_matter():
    q, k, v, sk, sv, lam, kpm = make_inputs(2, 4, 2, 9, 16, "per_batch", True)
    outs = [
        sinkdlm.sink_attention_reference(q, k, v, sk, sv, key_padding_mask=kpm, sink_position=p)
        for p in (0, 4, 9)
    ]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-12, rtol=1e-12)


def test_sink_attention_mask():
    m = sinkdlm.sink_attention_mask(4, sink_position=2)
    assert m.shape == (5, 5) and m.dtype == torch.bool
    assert m[2].tolist() == [False, False, True, False, False]  # the sink sees only itself
    assert m[:, 2].all()  # everyone sees the sink
    assert m[[0, 1, 3, 4]][:, [0, 1, 3, 4]].all()
    kpm = torch.tensor([[True, True, False, True]])
    mb = sinkdlm.sink_attention_mask(4, sink_position=0, key_padding_mask=kpm)
    assert mb.shape == (1, 5, 5)
    assert mb[0, :, 3].tolist() == [False] * 5  # the padded token (index 2 -> 3) is no key
    assert mb[0, 0].tolist() == [True, False, False, False, False]
    with pytest.raises(ValueError, match="sink_position must be in"):
        sinkdlm.sink_attention_mask(4, sink_position=5)


def test_dense_mask_through_sdpa_equals_sink_attention():
    """The mask is meant for SDPA users: check that route against the operator."""
    q, k, v, sk, sv, _, kpm = make_inputs(2, 4, 4, 11, 16, "shared", True)
    B, H, L, D = q.shape
    p = 5

    def insert(x, t):
        return torch.cat([x[:, :, :p], t.expand(B, H, D).unsqueeze(2), x[:, :, p:]], dim=2)

    mask = sinkdlm.sink_attention_mask(L, p, kpm)[:, None]
    dense = torch.nn.functional.scaled_dot_product_attention(
        insert(q, sk), insert(k, sk), insert(v, sv), attn_mask=mask
    )
    dense = torch.cat([dense[:, :, :p], dense[:, :, p + 1 :]], dim=2)
    ours = sinkdlm.sink_attention(q, k, v, sk, sv, key_padding_mask=kpm)
    real = kpm[:, None, :, None]
    torch.testing.assert_close(ours * real, dense * real, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("sink", ["none", "per_batch", "shared+logit"])
@pytest.mark.parametrize("padding", [False, True], ids=["nopad", "pad"])
def test_composite_path_matches_reference(sink, padding):
    """The route taken on devices without a native kernel (test_sink_attention_composed.py
    covers it in depth)."""
    q, k, v, sk, sv, lam, kpm = make_inputs(2, 8, 2, 33, 16, sink, padding)
    got, got_lse = sink_attention_composite(q, k, v, sk, sv, lam, kpm, None, 0.25)
    want, want_lse = sinkdlm.sink_attention_reference(
        q, k, v, sk, sv, sink_logit=lam, key_padding_mask=kpm, scale=0.25, return_lse=True
    )
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got_lse, want_lse, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("sink", ["shared+logit", "logit", "per_batch"])
def test_device_without_kernel_takes_the_composite_route(sink, monkeypatch):
    """With no kernel for the device the dispatcher reports, sink_attention runs the composite
    (the same merge in plain torch ops), forward and backward."""
    monkeypatch.setattr(sink_attention_module, "has_native_kernel", lambda op, device_type: False)
    called = []
    monkeypatch.setattr(torch.ops.sinkdlm, "sink_attention_fwd", lambda *a: called.append(a))
    check(*make_inputs(2, 4, 2, 13, 16, sink, True), torch.float64)
    assert not called


@pytest.mark.parametrize("sink", ["shared+logit", "per_batch", "logit"])
def test_gradcheck(sink):
    q, k, v, sk, sv, lam, kpm = make_inputs(2, 4, 2, 6, 8, sink, True)
    inputs = [t.requires_grad_() if t is not None else None for t in (q, k, v, sk, sv, lam)]

    def f(q, k, v, sk, sv, lam):
        out, lse = sinkdlm.sink_attention(
            q, k, v, sk, sv, sink_logit=lam, key_padding_mask=kpm, return_lse=True
        )
        return out, lse

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


def opcheck_cases():
    yield make_inputs(2, 4, 2, 9, 16, "shared+logit", True, dtype=torch.float32), 0.25
    yield make_inputs(1, 2, 2, 5, 8, "per_batch", False, dtype=torch.float64), 0.5
    yield make_inputs(2, 2, 1, 3, 8, "none", False, dtype=torch.bfloat16), 0.35


@pytest.mark.parametrize("case", range(3))
def test_opcheck(case):
    (q, k, v, sk, sv, lam, kpm), scale = list(opcheck_cases())[case]
    args = [
        t.requires_grad_() if t is not None and t.is_floating_point() else t
        for t in (q, k, v, sk, sv, lam)
    ]
    torch.library.opcheck(torch.ops.sinkdlm.sink_attention_fwd.default, (*args, kpm, kpm, scale))


@pytest.mark.parametrize("op", ["sink_attention_bwd", "sink_attention_composed_bwd"])
def test_opcheck_backward_with_strided_inputs(op):
    """The backward ops' fakes lay their gradients out as the kernels do: the native kernel's
    are contiguous, the composed path's on the CPU (B, L, H, D)-major, for q, k, v either laid
    out so (as Hugging Face models pass them) or contiguous, and for the widened copies a
    gradient through lse takes (the backend's gradients are then copied)."""
    B, H, Hkv, L, D = 2, 4, 2, 7, 16
    g = torch.Generator().manual_seed(3)

    def strided(heads):
        return torch.randn(B, L, heads, D, generator=g).transpose(1, 2)

    sk, sv, lam = torch.randn(Hkv, D, generator=g), torch.randn(Hkv, D, generator=g), None
    kpm = torch.ones(B, L, dtype=torch.bool)
    kpm[0, :2] = False
    forward = "sink_attention_fwd" if op == "sink_attention_bwd" else "sink_attention_composed_fwd"
    for q, k, v in (
        (strided(H), strided(Hkv), strided(Hkv)),
        make_inputs(B, H, Hkv, L, D, "none", False, torch.float32)[:3],
    ):
        out, lse = getattr(torch.ops.sinkdlm, forward)(q, k, v, sk, sv, lam, kpm, None, 0.25)
        for grad_lse in (torch.randn_like(lse), None):
            args = (torch.randn_like(out), grad_lse, q, k, v, sk, sv, lam, kpm, None, out, lse,
                    0.25)  # fmt: skip
            torch.library.opcheck(getattr(torch.ops.sinkdlm, op).default, args)


def test_torch_compile_fullgraph():
    q, k, v, sk, sv, lam, kpm = make_inputs(
        2, 4, 2, 17, 16, "shared+logit", True, dtype=torch.float32
    )
    for t in (q, k, v, sk, sv, lam):
        t.requires_grad_()

    def loss(q, k, v, sk, sv, lam):
        out = sinkdlm.sink_attention(q, k, v, sk, sv, sink_logit=lam, key_padding_mask=kpm)
        return (out * out).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    eager_grads = torch.autograd.grad(loss(q, k, v, sk, sv, lam), (q, k, sk, lam))
    compiled_grads = torch.autograd.grad(compiled(q, k, v, sk, sv, lam), (q, k, sk, lam))
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_only_lse_used_in_loss():
    q, k, v, sk, sv, lam, kpm = make_inputs(1, 2, 2, 5, 8, "shared", False)
    q.requires_grad_()
    _, lse = sinkdlm.sink_attention(q, k, v, sk, sv, return_lse=True)
    (g,) = torch.autograd.grad(lse.sum(), q)
    qr = q.detach().clone().requires_grad_()
    _, r_lse = sinkdlm.sink_attention_reference(qr, k, v, sk, sv, return_lse=True)
    (gr,) = torch.autograd.grad(r_lse.sum(), qr)
    torch.testing.assert_close(g, gr)


def test_padded_rows_are_zero_and_finite():
    q, k, v, sk, sv, lam, _ = make_inputs(2, 2, 2, 6, 8, "none", False)
    kpm = torch.tensor([[False, False, True, True, True, True], [True] * 6])
    out, lse = sinkdlm.sink_attention(q, k, v, key_padding_mask=kpm, return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert (out[0, :, :2] == 0).all() and (lse[0, :, :2] == 0).all()


# ---- bad input --------------------------------------------------------------------------


def _good():
    q, k, v, sk, sv, lam, kpm = make_inputs(
        2, 4, 2, 5, 8, "shared+logit", True, dtype=torch.float32
    )
    return dict(q=q, k=k, v=v, sink_k=sk, sink_v=sv, sink_logit=lam, key_padding_mask=kpm)


BAD = {
    "q rank": (dict(q=torch.randn(2, 4, 5)), ValueError, r"q must be 4-D \(B, H, L, D\)"),
    "k batch": (dict(k=torch.randn(3, 2, 5, 8)), ValueError, r"k must be \(B, Hkv, Lk, D\)"),
    "v length": (dict(v=torch.randn(2, 2, 6, 8)), ValueError, r"v must be the shape of k"),
    "head dim": (
        dict(k=torch.randn(2, 2, 5, 4), v=torch.randn(2, 2, 5, 4)),
        ValueError,
        r"k must be .*= \(2, Hkv, Lk, 8\)",
    ),
    "gqa": (
        dict(k=torch.randn(2, 3, 5, 8), v=torch.randn(2, 3, 5, 8)),
        ValueError,
        r"dividing q's H = 4",
    ),
    "dtype mix": (
        dict(k=torch.randn(2, 2, 5, 8, dtype=torch.float64)),
        TypeError,
        r"k must be torch.float32 like q",
    ),
    "int q": (
        dict(q=torch.ones(2, 4, 5, 8, dtype=torch.int64)),
        TypeError,
        r"q must be float32, float64, float16 or bfloat16",
    ),
    "device mix": (
        dict(v=torch.randn(2, 2, 5, 8, device="meta")),
        ValueError,
        r"v must be on cpu like q",
    ),
    "sink shape": (
        dict(sink_k=torch.randn(4, 8), sink_v=torch.randn(4, 8)),
        ValueError,
        r"sink_k must be \(Hkv, D\) = \(2, 8\) or \(B, Hkv, D\)",
    ),
    "sink_k alone": (dict(sink_v=None), ValueError, r"sink_k was given without sink_v"),
    "sink_v alone": (dict(sink_k=None), ValueError, r"sink_v was given without sink_k"),
    "sink dtype": (
        dict(
            sink_v=torch.randn(2, 8, dtype=torch.float64),
            sink_k=torch.randn(2, 8, dtype=torch.float64),
        ),
        TypeError,
        r"sink_k must be torch.float32 like q",
    ),
    "logit shape": (
        dict(sink_logit=torch.randn(2)),
        ValueError,
        r"sink_logit must be \(H,\) = \(4,\)",
    ),
    "logit int": (
        dict(sink_logit=torch.ones(4, dtype=torch.int32)),
        TypeError,
        r"sink_logit must be a floating-point tensor",
    ),
    "mask dtype": (
        dict(key_padding_mask=torch.ones(2, 5)),
        TypeError,
        r"key_padding_mask must be a bool tensor",
    ),
    "mask shape": (
        dict(key_padding_mask=torch.ones(2, 6, dtype=torch.bool)),
        ValueError,
        r"key_padding_mask must be \(B, Lk\) = \(2, 5\)",
    ),
    "query mask shape": (
        dict(query_padding_mask=torch.ones(2, 4, dtype=torch.bool)),
        ValueError,
        r"query_padding_mask must be \(B, Lq\) = \(2, 5\)",
    ),
    "not a tensor": (dict(q=[1.0]), TypeError, r"q must be a torch.Tensor"),
    # Issue 19: True passed as 1.0, nan raised TypeError, 1e300 overflowed float32 to NaN.
    "scale bool": (dict(scale=True), TypeError, r"scale must be a real number, got bool True"),
    "scale str": (dict(scale="0.5"), TypeError, r"scale must be a real number, got str '0.5'"),
    "scale nan": (dict(scale=float("nan")), ValueError, r"scale must be a finite number, got nan"),
    "scale inf": (dict(scale=float("-inf")), ValueError, r"scale must be a finite number"),
    "scale huge": (
        dict(scale=1e300),
        ValueError,
        r"scale must be finite in torch.float32 \(the accumulation type of torch.float32\)",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_clearly(case):
    override, exc, pattern = BAD[case]
    kwargs = {**_good(), **override}
    with pytest.raises(exc, match=pattern):
        sinkdlm.sink_attention(
            kwargs.pop("q"),
            kwargs.pop("k"),
            kwargs.pop("v"),
            kwargs.pop("sink_k"),
            kwargs.pop("sink_v"),
            **kwargs,
        )


def test_numpy_and_integer_scales_are_accepted():
    """Issue 19: np.float32(0.25) was refused as "must be a finite float, got 0.25"."""
    g = _good()
    args = (g["q"], g["k"], g["v"], g["sink_k"], g["sink_v"])
    want = sinkdlm.sink_attention(*args, scale=0.25)
    for scale in (np.float32(0.25), np.float64(0.25)):
        torch.testing.assert_close(sinkdlm.sink_attention(*args, scale=scale), want)
    torch.testing.assert_close(
        sinkdlm.sink_attention(*args, scale=np.int64(1)), sinkdlm.sink_attention(*args, scale=1.0)
    )
    q64, k64, v64 = (t.double() for t in args[:3])
    sinkdlm.sink_attention(q64, k64, v64, scale=1e300)  # finite in float64: allowed


def test_op_called_directly_checks_too():
    """The raw op (bypassing the Python checks) must refuse, not read out of bounds."""
    g = _good()
    with pytest.raises(RuntimeError, match="sink_k/sink_v must be"):
        torch.ops.sinkdlm.sink_attention_fwd(
            g["q"], g["k"], g["v"], torch.randn(3, 8), torch.randn(3, 8), None, None, None, 1.0
        )
    with pytest.raises(RuntimeError, match="H % Hkv == 0"):
        torch.ops.sinkdlm.sink_attention_fwd(
            g["q"],
            torch.randn(2, 3, 5, 8),
            torch.randn(2, 3, 5, 8),
            None,
            None,
            None,
            None,
            None,
            1.0,
        )


# ---- queries and keys of different lengths (a block's queries over cached keys) -----------


def make_block_inputs(B, H, Hkv, Lq, Lk, D, sink, padding, dtype=torch.float64, seed=0):
    """Lq queries over Lk keys; with padding, left-padded keys and some padded queries."""
    q, _, _, sink_k, sink_v, sink_logit, _ = make_inputs(
        B, H, Hkv, Lq, D, sink, False, dtype, seed=seed
    )
    _, k, v, *_ = make_inputs(B, H, Hkv, Lk, D, "none", False, dtype, seed=seed + 1)
    kpm = qpm = None
    if padding:
        g = torch.Generator().manual_seed(seed + 2)
        lengths = torch.randint(1, Lk + 1, (B,), generator=g)
        kpm = (torch.arange(Lk)[None, :] < lengths[:, None]).flip(-1)
        qpm = torch.rand(B, Lq, generator=g) < 0.8
    return q, k, v, sink_k, sink_v, sink_logit, kpm, qpm


BLOCK_SHAPES = [  # (B, H, Hkv, Lq, Lk, D)
    (1, 1, 1, 1, 9, 16),
    (2, 4, 2, 32, 96, 32),
    (3, 8, 2, 7, 300, 64),
    (1, 4, 1, 70, 5, 16),  # more queries than keys
    (2, 2, 2, 300, 600, 16),  # several query and key tiles
]


@pytest.mark.parametrize("padding", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("sink", SINKS)
@pytest.mark.parametrize("shape", BLOCK_SHAPES, ids=lambda s: "B{}H{}Hkv{}Lq{}Lk{}D{}".format(*s))
@pytest.mark.parametrize("backend", ["native", "composed"])
def test_queries_and_keys_of_different_lengths(shape, sink, padding, backend):
    q, k, v, sk, sv, lam, kpm, qpm = make_block_inputs(*shape, sink, padding)
    tensors = [q, k, v, sk, sv, lam]
    ours = [t.clone().requires_grad_() if t is not None else None for t in tensors]
    ref = [t.clone().requires_grad_() if t is not None else None for t in tensors]
    kwargs = dict(key_padding_mask=kpm, query_padding_mask=qpm, return_lse=True)
    out, lse = sinkdlm.sink_attention(*ours[:5], sink_logit=ours[5], backend=backend, **kwargs)
    r_out, r_lse = sinkdlm.sink_attention_reference(
        *ref[:5], sink_logit=ref[5], sink_position=shape[4] // 3, **kwargs
    )
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    g = torch.Generator().manual_seed(3)
    d_out, d_lse = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    ((out * d_out).sum() + (lse * d_lse).sum()).backward()
    ((r_out * d_out).sum() + (r_lse * d_lse).sum()).backward()
    grads = [t.grad if t is not None else None for t in ours]
    r_grads = [t.grad if t is not None else None for t in ref]
    assert_close_all([out, lse, *grads], [r_out, r_lse, *r_grads], torch.float64, NAMES)
    if qpm is not None:
        assert (out[~qpm[:, None].expand_as(lse)] == 0).all()


def test_block_queries_equal_rows_of_the_whole_sequence():
    """The rectangular form is the square one's rows: queries [a, b) of a sequence over all its
    keys give what the whole sequence's attention gives on those rows (padded keys too)."""
    q, k, v, sk, sv, lam, kpm = make_inputs(2, 4, 2, 40, 16, "per_batch", True)
    whole = sinkdlm.sink_attention_reference(q, k, v, sk, sv, key_padding_mask=kpm)
    a, b = 24, 32
    rows = kpm[:, a:b]
    block = sinkdlm.sink_attention(
        q[:, :, a:b], k, v, sk, sv, key_padding_mask=kpm, query_padding_mask=rows
    )
    torch.testing.assert_close(block, whole[:, :, a:b], atol=1e-12, rtol=1e-12)
    # Without a query mask every block query counts as real (Lq != Lk).
    real = sinkdlm.sink_attention(q[:, :, a:b], k, v, sk, sv, key_padding_mask=kpm)
    unpadded = sinkdlm.sink_attention_reference(
        q, k, v, sk, sv, key_padding_mask=kpm, query_padding_mask=torch.ones_like(kpm)
    )
    torch.testing.assert_close(real, unpadded[:, :, a:b], atol=1e-12, rtol=1e-12)


def test_query_sees_no_key_returns_zero():
    q, k, v, *_ = make_block_inputs(2, 2, 2, 3, 4, 8, "none", False)
    kpm = torch.tensor([[False] * 4, [True, False, True, True]])
    for op in (sinkdlm.sink_attention, sinkdlm.sink_attention_reference):
        out, lse = op(q, k, v, key_padding_mask=kpm, return_lse=True)
        assert (out[0] == 0).all() and (lse[0] == 0).all() and torch.isfinite(out).all()


@pytest.mark.parametrize("sink", ["shared+logit", "per_batch"])
def test_gradcheck_different_lengths(sink):
    q, k, v, sk, sv, lam, kpm, qpm = make_block_inputs(2, 4, 2, 3, 7, 8, sink, True)
    inputs = [t.requires_grad_() if t is not None else None for t in (q, k, v, sk, sv, lam)]

    def f(q, k, v, sk, sv, lam):
        return sinkdlm.sink_attention(
            q,
            k,
            v,
            sk,
            sv,
            sink_logit=lam,
            key_padding_mask=kpm,
            query_padding_mask=qpm,
            return_lse=True,
        )

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


@needs
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_different_lengths_low_precision_and_composite(device, dtype):
    q, k, v, sk, sv, lam, kpm, qpm = make_block_inputs(2, 8, 2, 32, 129, 64, "per_batch", True)
    want = sinkdlm.sink_attention_reference(
        q, k, v, sk, sv, key_padding_mask=kpm, query_padding_mask=qpm
    )
    cast = [t.to(device, dtype) for t in (q, k, v, sk, sv)]
    masks = dict(key_padding_mask=kpm.to(device), query_padding_mask=qpm.to(device))
    got = sinkdlm.sink_attention(*cast, **masks)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.double().cpu(), want, atol=atol, rtol=rtol)
    composite, _ = sink_attention_composite(
        *cast, None, masks["key_padding_mask"], masks["query_padding_mask"], 0.125
    )
    torch.testing.assert_close(composite.double().cpu(), want, atol=atol, rtol=rtol)
    composed = sinkdlm.sink_attention(*cast, **masks, backend="composed")
    torch.testing.assert_close(composed.double().cpu(), want, atol=atol, rtol=rtol)


def test_opcheck_different_lengths():
    q, k, v, sk, sv, lam, kpm, qpm = make_block_inputs(2, 4, 2, 5, 11, 8, "shared+logit", True)
    args = [t.requires_grad_() for t in (q, k, v, sk, sv, lam)]
    torch.library.opcheck(torch.ops.sinkdlm.sink_attention_fwd.default, (*args, kpm, qpm, 0.3))


def test_sink_attention_mask_for_separate_queries():
    kpm = torch.tensor([[False, True, True, True]])
    m = sinkdlm.sink_attention_mask(4, sink_position=1, key_padding_mask=kpm, query_length=2)
    assert m.shape == (1, 2, 5)
    assert m[0].tolist() == [[False, True, True, True, True]] * 2  # sink at 1, key 0 padded
    assert sinkdlm.sink_attention_mask(3, query_length=2).all()
    with pytest.raises(ValueError, match="query_length must be"):
        sinkdlm.sink_attention_mask(3, query_length=-1)


def test_reference_gradients_finite_for_an_all_padding_sequence():
    """Issue 19: with no sink token, a fully padded batch row gave NaN in the reference's dv
    (its forward was finite): every key of that row is masked, the softmax is 0/0."""
    q, k, v, *_ = make_inputs(2, 2, 1, 4, 8, "none", False)
    kpm = torch.tensor([[False] * 4, [True, True, False, True]])
    for t in (q, k, v):
        t.requires_grad_()
    out = sinkdlm.sink_attention_reference(q, k, v, key_padding_mask=kpm)
    dq, dk, dv = torch.autograd.grad((out * torch.randn_like(out)).sum(), (q, k, v))
    for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(g).all(), name
        assert (g[0] == 0).all(), f"{name} of the all-padding row"


@pytest.mark.parametrize("sink", ["none", "shared+logit", "per_batch", "logit"])
def test_double_backward_matches_reference(sink):
    """Issue 19: second-order gradients were silently zero (no autograd for the backward op)."""
    q, k, v, sk, sv, lam, kpm = make_inputs(2, 4, 2, 6, 8, sink, True)
    inputs = [t.requires_grad_() for t in (q, k, v, sk, sv, lam) if t is not None]

    def second_order(fn):
        out, lse = fn(q, k, v, sk, sv, sink_logit=lam, key_padding_mask=kpm, return_lse=True)
        loss = (out**3).sum() + (lse * torch.linspace(-1, 1, lse.numel()).view_as(lse)).sum()
        grads = torch.autograd.grad(loss, inputs, create_graph=True)
        return torch.autograd.grad(sum((g**2).sum() for g in grads), inputs)

    got, want = second_order(sinkdlm.sink_attention), second_order(sinkdlm.sink_attention_reference)
    for a, b in zip(got, want, strict=True):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_gradgradcheck():
    q, k, v, sk, sv, lam, kpm = make_inputs(1, 2, 1, 4, 4, "shared+logit", True)
    inputs = [t.requires_grad_() for t in (q, k, v, sk, sv, lam)]

    def f(q, k, v, sk, sv, lam):
        return sinkdlm.sink_attention(
            q, k, v, sk, sv, sink_logit=lam, key_padding_mask=kpm, return_lse=True
        )

    assert torch.autograd.gradgradcheck(f, inputs, eps=1e-6, atol=1e-6, fast_mode=True)


def test_double_backward_low_precision_keeps_dtypes():
    q, k, v, *_ = make_inputs(1, 2, 2, 5, 8, "none", False, dtype=torch.bfloat16)
    for t in (q, k, v):
        t.requires_grad_()
    (g,) = torch.autograd.grad(sinkdlm.sink_attention(q, k, v).float().sum(), q, create_graph=True)
    assert g.dtype == torch.bfloat16
    (h,) = torch.autograd.grad(g.float().pow(2).sum(), k)
    assert h.dtype == torch.bfloat16 and h.abs().sum() > 0


def tile_spanning_padding(kind, B, L, seed):
    """Key padding across the 512-key tiles: left padding reaching into the second tile (700
    keys, or all of them for L <= 700: a sequence of padding only) next to a row with 3, or
    holes in every tile (never periodic in 512, so a mask read without its tile offset shows)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "left":
        pads = torch.tensor([min(L, 700), 3][:B])
        return torch.arange(L)[None, :] >= pads[:, None]
    return torch.rand(B, L, generator=g) < 0.7


MULTI_TILE = [  # (L, padding, sink, dtype): float32 (BLAS tiles) on every combination
    *itertools.product(
        [513, 1100], ["left", "holes"], ["none", "per_batch", "shared+logit"], [torch.float32]
    ),
    (513, "holes", "shared+logit", torch.bfloat16),  # the bf16 GEMM tiles (avx512_bf16 CPUs)
    (1100, "left", "per_batch", torch.bfloat16),
    (1100, "holes", "shared+logit", torch.float64),
]


@pytest.mark.parametrize(
    "L, padding, sink, dtype", MULTI_TILE, ids=lambda x: str(x).replace("torch.", "")
)
def test_lengths_past_one_key_tile(L, padding, sink, dtype):
    """Issue 19: no test had L above the CPU kernel's 512-key tile, so the multi-tile path
    (cross-tile rescaling, the tile offset of the padding mask) never ran under test. Forward,
    lse and every gradient, with padding in several tiles."""
    q, k, v, sk, sv, lam, _ = make_inputs(2, 2, 1, L, 32, sink, False, dtype=dtype, seed=L)
    kpm = tile_spanning_padding(padding, 2, L, seed=L)
    assert (~kpm[:, 512:]).any() and (~kpm[:, :512]).any()
    check(q, k, v, sk, sv, lam, kpm, dtype)


@pytest.mark.parametrize("sink", ["logit", "shared+logit"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
def test_minus_infinity_logit_sink(sink, dtype):
    """Issue 19: a -inf logit sink without a sink token gave NaN in every row of the head (lse
    too); the reference is finite. A float16 logit of -7e4 already rounds to -inf."""
    q, k, v, sk, sv, lam, kpm = make_inputs(2, 4, 2, 9, 8, sink, True, dtype=dtype)
    lam = lam.clone()
    lam[1] = float("-inf")
    lam[2] = torch.tensor(-7e4).to(dtype)  # -inf in float16
    check(q, k, v, sk, sv, lam, kpm, dtype)


@needs
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_low_precision_runs_no_reference_code(device, dtype, monkeypatch):
    """Issue 19: on CUDA, return_lse=True (and a logit sink) took the dense reference form, so
    test_low_precision compared the reference with itself. Whatever a device runs for
    sink_attention, forward and backward with the lse and a logit sink, it must not be that."""
    reference_module = importlib.import_module("sinkdlm.ops.reference")

    def forbidden(*args, **kwargs):
        raise AssertionError("sink_attention ran the dense reference form")

    for module in (reference_module, sink_attention_module):
        for name in ("dense_sink_attention", "sink_attention_reference"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, forbidden)
    q, k, v, sk, sv, lam, kpm = make_inputs(2, 4, 2, 33, 16, "shared+logit", True, dtype, device)
    for t in (q, k, v, sk, sv, lam):
        t.requires_grad_()
    out, lse = sinkdlm.sink_attention(
        q, k, v, sk, sv, sink_logit=lam, key_padding_mask=kpm, return_lse=True
    )
    (out.float().sum() + lse.sum()).backward()
    assert q.grad is not None and lam.grad is not None


@pytest.mark.parametrize("kind", ["cpu_flash", "blocked"])
@pytest.mark.parametrize("sink", ["none", "per_batch", "shared+logit"])
def test_different_lengths_through_the_plain_torch_composite(kind, sink, monkeypatch):
    """Devices without a kernel (the fused-kernel route and the blocked one), Lq != Lk."""
    composite_module = importlib.import_module("sinkdlm.ops.sink_attention_composite")
    monkeypatch.setattr(sink_attention_module, "has_native_kernel", lambda op, device_type: False)
    monkeypatch.setattr(composite_module, "_attention_kind", lambda q: kind)
    q, k, v, sk, sv, lam, kpm, qpm = make_block_inputs(2, 4, 2, 9, 300, 16, sink, True)
    tensors = [q, k, v, sk, sv, lam]
    ours = [t.clone().requires_grad_() if t is not None else None for t in tensors]
    ref = [t.clone().requires_grad_() if t is not None else None for t in tensors]
    kwargs = dict(key_padding_mask=kpm, query_padding_mask=qpm, return_lse=True)
    out, lse = sinkdlm.sink_attention(*ours[:5], sink_logit=ours[5], **kwargs)
    r_out, r_lse = sinkdlm.sink_attention_reference(*ref[:5], sink_logit=ref[5], **kwargs)
    g = torch.Generator().manual_seed(4)
    d_out, d_lse = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    ((out * d_out).sum() + (lse * d_lse).sum()).backward()
    ((r_out * d_out).sum() + (r_lse * d_lse).sum()).backward()
    grads = [t.grad if t is not None else None for t in ours]
    r_grads = [t.grad if t is not None else None for t in ref]
    assert_close_all([out, lse, *grads], [r_out, r_lse, *r_grads], torch.float64, NAMES)
