"""sinkdlm.analysis.attention_mass (ops/attention_mass.py) against the dense float64 form, on the
native kernels and on the query-chunked composite."""

import importlib
import math

import pytest
import torch
from conftest import devices

import sinkdlm
from sinkdlm.analysis import attention_mass, attention_mass_reference

am_module = importlib.import_module("sinkdlm.ops.attention_mass")
DEVICES = devices()


def dense_lse(q, k, sink_k, sink_logit, kpm, scale):
    """Log-sum-exp per query row over [keys ; sinks], float64, dense (independent of the op)."""
    b, h, n, d = q.shape
    g = h // k.shape[1]
    s = torch.einsum("bhid,bhjd->bhij", q.double(), k.double().repeat_interleave(g, 1)) * scale
    if kpm is not None:
        s = s.masked_fill(~kpm[:, None, None, :], float("-inf"))
    extra = []
    if sink_k is not None:
        sk = sink_k.double()
        sk = (sk if sk.dim() == 3 else sk.expand(b, -1, -1)).repeat_interleave(g, 1)
        extra.append(torch.einsum("bhid,bhd->bhi", q.double(), sk)[..., None] * scale)
    if sink_logit is not None:
        extra.append(sink_logit.double().view(1, h, 1, 1).expand(b, h, n, 1))
    return torch.logsumexp(torch.cat([s, *extra], -1), -1)


CASES = [
    # B, H, Hkv, L, D, sink_k ("2d"/"3d"/None), sink_logit, padding
    (2, 4, 2, 70, 16, "2d", False, True),
    (1, 3, 3, 1, 8, None, False, False),
    (3, 2, 1, 65, 5, "3d", True, True),
    (2, 2, 2, 9, 4, None, True, False),
    (1, 8, 2, 130, 32, "2d", False, False),
]


def make_inputs(case, dtype, device, seed=0):
    b, h, hkv, n, d, sink, logit, pad = case
    g = torch.Generator().manual_seed(seed)
    # q non-contiguous: a (B,L,H,D) tensor viewed as (B,H,L,D).
    q = torch.randn(b, n, h, d, generator=g, dtype=torch.float64).transpose(1, 2)
    k = torch.randn(b, hkv, n, d, generator=g, dtype=torch.float64) * 1.5
    sk = None
    if sink == "2d":
        sk = torch.randn(hkv, d, generator=g, dtype=torch.float64)
    elif sink == "3d":
        sk = torch.randn(b, hkv, d, generator=g, dtype=torch.float64)
    sl = torch.randn(h, generator=g, dtype=torch.float64) if logit else None
    kpm = None
    if pad:
        kpm = torch.ones(b, n, dtype=torch.bool)
        for i in range(b):
            kpm[i, n - 2 * i :] = False  # sequence i has 2i padded tail tokens
    scale = 1.0 / math.sqrt(d)
    lse = dense_lse(q, k, sk, sl, kpm, scale)
    if kpm is not None:
        lse = lse.masked_fill(~kpm[:, None, :], 0.0)

    def move(t):
        return (
            None
            if t is None
            else t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        )

    return [move(t) for t in (q, k, lse, sk, sl, kpm)], scale


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("path", ["native", "chunked"])
def test_attention_mass_matches_dense(device, dtype, case, path, monkeypatch):
    (q, k, lse, sk, sl, kpm), scale = make_inputs(case, dtype, device)
    if path == "chunked":
        monkeypatch.setattr(am_module, "has_native_kernel", lambda op, device_type: False)
        monkeypatch.setattr(am_module, "_QUERY_CHUNK", 7)  # several chunks, a ragged last one
    mass, sink_mass = attention_mass(
        q, k, lse, sk, sink_logit=sl, key_padding_mask=kpm, scale=scale
    )
    want, want_sink = attention_mass_reference(
        q, k, sk, sink_logit=sl, key_padding_mask=kpm, scale=scale
    )
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    assert mass.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(mass.double(), want, **tol)
    torch.testing.assert_close(sink_mass.double(), want_sink, **tol)
    # every softmax row sums to 1: keys + sink account for all the mass
    total = mass.double().sum(-1) + sink_mass.double()
    torch.testing.assert_close(total, torch.ones_like(total), **tol)


@pytest.mark.parametrize("case", CASES)
def test_attention_mass_bfloat16_inputs_on_the_cpu(case):
    """bfloat16 q and k go to the CPU kernel as they are (its scores on the BLAS's bfloat16
    GEMM); the result is float32 and matches the dense form over the same rounded values."""
    (q, k, _, sk, sl, kpm), scale = make_inputs(case, torch.float64, "cpu")
    q16, k16 = q.to(torch.bfloat16), k.to(torch.bfloat16)
    lse = dense_lse(q16.double(), k16.double(), sk, sl, kpm, scale)
    if kpm is not None:
        lse = lse.masked_fill(~kpm[:, None, :], 0.0)
    sk32, sl32 = (None if t is None else t.float() for t in (sk, sl))
    args = (q16, k16, lse.float(), sk32, sl32, kpm, scale)
    torch.library.opcheck(torch.ops.sinkdlm.attention_mass.default, args)
    mass, sink_mass = attention_mass(
        q16, k16, lse.float(), sk32, sink_logit=sl32, key_padding_mask=kpm, scale=scale
    )
    want, want_sink = attention_mass_reference(
        q16.double(), k16.double(), sk, sink_logit=sl, key_padding_mask=kpm, scale=scale
    )
    assert mass.dtype == sink_mass.dtype == torch.float32
    torch.testing.assert_close(mass.double(), want, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(sink_mass.double(), want_sink, rtol=2e-5, atol=1e-6)


def test_attention_mass_with_lse_from_sink_attention():
    (q, k, _, sk, _, kpm), scale = make_inputs(CASES[0], torch.float64, "cpu", seed=3)
    v = torch.randn_like(k)
    _, lse = sinkdlm.sink_attention(
        q, k, v, sk, torch.randn_like(sk), key_padding_mask=kpm, scale=scale, return_lse=True
    )
    mass, sink_mass = attention_mass(q, k, lse, sk, key_padding_mask=kpm, scale=scale)
    want, want_sink = attention_mass_reference(q, k, sk, key_padding_mask=kpm, scale=scale)
    torch.testing.assert_close(mass, want)
    torch.testing.assert_close(sink_mass, want_sink)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_mass_opcheck(device):
    for case in (CASES[0], CASES[2]):
        (q, k, lse, sk, sl, kpm), scale = make_inputs(case, torch.float32, device)
        torch.library.opcheck(
            torch.ops.sinkdlm.attention_mass.default, (q, k, lse, sk, sl, kpm, scale)
        )


def test_attention_mass_compiles():
    (q, k, lse, sk, sl, kpm), scale = make_inputs(CASES[2], torch.float32, "cpu")
    fn = torch.compile(
        lambda *a: attention_mass(*a[:4], sink_logit=a[4], key_padding_mask=a[5], scale=scale),
        fullgraph=True,
    )
    got = fn(q, k, lse, sk, sl, kpm)
    want = attention_mass(q, k, lse, sk, sink_logit=sl, key_padding_mask=kpm, scale=scale)
    torch.testing.assert_close(got, want)


def test_attention_mass_bad_input():
    (q, k, lse, sk, sl, kpm), scale = make_inputs(CASES[0], torch.float32, "cpu")
    with pytest.raises(ValueError, match="lse must be"):
        attention_mass(q, k, lse[:, :1])
    with pytest.raises(ValueError, match="k must be"):
        attention_mass(q, k[:, :, :5], lse)
    with pytest.raises(ValueError, match="sink_k must be"):
        attention_mass(q, k, lse, sk[:, :3])
    with pytest.raises(TypeError, match="attention_mass: key_padding_mask must be a bool tensor"):
        attention_mass(q, k, lse, key_padding_mask=kpm.int())
    with pytest.raises(ValueError, match=r"attention_mass: key_padding_mask must be \(B,L\)"):
        attention_mass(q, k, lse, key_padding_mask=kpm[:, :3])
    with pytest.raises(RuntimeError, match="key_padding_mask must be bool"):
        torch.ops.sinkdlm.attention_mass(q, k, lse, None, None, kpm[:, :3], scale)
    with pytest.raises(TypeError, match="float32, float64 or bfloat16, got Half"):
        torch.ops.sinkdlm.attention_mass(q.half(), k.half(), lse.half(), None, None, None, scale)
    with pytest.raises(TypeError, match="lse dtype Float, got BFloat16 and BFloat16"):
        q16, k16 = q.bfloat16(), k.bfloat16()
        torch.ops.sinkdlm.attention_mass(q16, k16, lse.bfloat16(), None, None, None, scale)


@pytest.mark.parametrize(
    "case, exc, pattern",
    [
        ("hkv0", ValueError, r"attention_mass: k must be \(B,Hkv,L,D\) with Hkv >= 1"),
        ("q list", TypeError, r"attention_mass: q must be a floating-point tensor, got list"),
        ("int lse", TypeError, r"attention_mass: lse must be a floating-point tensor"),
        ("scale bool", TypeError, r"attention_mass: scale must be a real number, got bool"),
        ("scale nan", ValueError, r"attention_mass: scale must be a finite number, got nan"),
        ("scale huge", ValueError, r"attention_mass: scale must be finite in torch.float32"),
    ],
)
def test_attention_mass_names_the_bad_argument(case, exc, pattern):
    """Issue 19: Hkv = 0 raised a RuntimeError from the kernel."""
    (q, k, lse, sk, sl, kpm), scale = make_inputs(CASES[0], torch.float32, "cpu")
    args, kwargs = [q, k, lse], {}
    if case == "hkv0":
        args[1] = k[:, :0]
    elif case == "q list":
        args[0] = q.tolist()
    elif case == "int lse":
        args[2] = lse.long()
    else:
        kwargs["scale"] = {"scale bool": True, "scale nan": math.nan, "scale huge": 1e300}[case]
    with pytest.raises(exc, match=pattern):
        attention_mass(*args, **kwargs)


def test_attention_mass_backward_raises():
    """Issue 19: without an autograd kernel, backward gave zero gradients with a warning."""
    (q, k, lse, sk, sl, kpm), scale = make_inputs(CASES[0], torch.float32, "cpu")
    q.requires_grad_()
    mass, sink_mass = attention_mass(q, k, lse, sk, scale=scale)
    with pytest.raises(NotImplementedError, match="attention_mass is not differentiable"):
        (mass.sum() + sink_mass.sum()).backward()
