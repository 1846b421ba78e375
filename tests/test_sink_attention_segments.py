"""sink_attention over packed rows (segment_ids): every route against the float64 reference."""

import importlib

import pytest
import torch

import sinkdlm
from sinkdlm.ops.reference import sink_attention_reference
from sinkdlm.ops.sink_attention_composite import sink_attention_composite
from sinkdlm.packing import (
    segment_ids_from_cu_seqlens,
    segment_ids_from_position_ids,
    segment_lengths,
)

composite_module = importlib.import_module("sinkdlm.ops.sink_attention_composite")

TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 3e-2)}
# Per row document lengths. 600 keys cross the CPU kernel's 512-key tile and its 256- (float)
# and 64-row (bf16) query tiles; documents of length 1 and boundaries off the 32-key panels.
ROWS = {
    "odd": [[3, 1, 9, 1, 23], [37]],
    "long": [[100, 1, 299, 200], [600]],
    "tile_edges": [[256, 256, 88], [1, 511, 1, 87]],
}
SINKS = ["none", "shared", "per_batch", "logit", "shared+logit"]


def segments_of(rows, device="cpu", dtype=torch.int64):
    ids = [torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows]
    return torch.stack(ids).to(device, dtype)


def make_inputs(rows, H, Hkv, D, sink, padding, dtype=torch.float64, seed=0):
    segment_ids = segments_of(rows)
    B, L = segment_ids.shape
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    q, k, v = randn(B, H, L, D), randn(B, Hkv, L, D), randn(B, Hkv, L, D)
    sink_k = sink_v = sink_logit = kpm = None
    if sink in ("shared", "shared+logit"):
        sink_k, sink_v = randn(Hkv, D), randn(Hkv, D)
    elif sink == "per_batch":
        sink_k, sink_v = randn(B, Hkv, D), randn(B, Hkv, D)
    if "logit" in sink:
        sink_logit = randn(H) + 1.0
    if padding:  # random holes and a padded tail
        kpm = torch.rand(B, L, generator=g) > 0.2
        kpm[:, -2:] = False
    return (q, k, v, sink_k, sink_v, sink_logit, kpm), segment_ids


def run_route(route, inputs, segment_ids, with_grad=True):
    """(out, lse, grads) of one route; grads of (out * w).sum() + lse.sum() wrt each input."""
    q, k, v, sink_k, sink_v, sink_logit, kpm = inputs
    leaves = [t.clone().requires_grad_() if t is not None else None for t in inputs[:6]]
    scale = q.shape[-1] ** -0.5
    if route in ("native", "composed", "auto"):
        out, lse = sinkdlm.sink_attention(
            *leaves[:5],
            sink_logit=leaves[5],
            key_padding_mask=kpm,
            segment_ids=segment_ids,
            return_lse=True,
            backend=route,
        )
    elif route == "reference":
        out, lse = sink_attention_reference(
            *leaves[:5],
            sink_logit=leaves[5],
            key_padding_mask=kpm,
            segment_ids=segment_ids,
            return_lse=True,
        )
    else:  # the plain-torch composite: its fused CPU kernel or its blocked form
        kind = composite_module._attention_kind
        try:
            if route == "composite_blocked":
                composite_module._attention_kind = lambda q: "blocked"
            out, lse = sink_attention_composite(*leaves[:6], kpm, None, scale, segment_ids)
        finally:
            composite_module._attention_kind = kind
    grads = None
    if with_grad:
        gen = torch.Generator().manual_seed(5)
        w = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
        loss = (out * w).sum() + lse.sum()
        wanted = [t for t in leaves if t is not None]
        grads = torch.autograd.grad(loss, wanted)
    return out, lse, grads


ROUTES = ["native", "composed", "composite_cpu_flash", "composite_blocked"]


@pytest.mark.parametrize("padding", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("sink", SINKS)
@pytest.mark.parametrize("rows", list(ROWS), ids=list(ROWS))
@pytest.mark.parametrize("route", ROUTES)
def test_routes_match_reference_float64(route, rows, sink, padding):
    inputs, seg = make_inputs(ROWS[rows], 4, 2, 16, sink, padding)
    want_out, want_lse, want_grads = run_route("reference", inputs, seg)
    out, lse, grads = run_route(route, inputs, seg)
    torch.testing.assert_close(out, want_out, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, want_lse, atol=1e-10, rtol=1e-10)
    for got, want in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("route", ["native", "composed"])
def test_low_precision_matches_reference(route, dtype):
    inputs, seg = make_inputs(ROWS["tile_edges"], 8, 2, 24, "shared+logit", True, dtype)
    wide = [t.double() if t is not None and t.is_floating_point() else t for t in inputs]
    want_out, want_lse, want_grads = run_route("reference", wide, seg)
    out, lse, grads = run_route(route, inputs, seg)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.double(), want_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.double(), want_lse, atol=atol, rtol=rtol)
    for got, want in zip(grads, want_grads, strict=True):
        scale = want.abs().max().item()  # gradients sum many terms: tolerance relative to size
        torch.testing.assert_close(got.double(), want, atol=atol * 4 * scale, rtol=rtol * 4)


def test_segments_change_the_result_and_one_segment_is_no_segment():
    inputs, seg = make_inputs(ROWS["odd"], 4, 2, 16, "shared", True)
    packed, _, _ = run_route("native", inputs, seg, with_grad=False)
    one = torch.zeros_like(seg)
    single, _, _ = run_route("native", inputs, one, with_grad=False)
    plain, _, _ = run_route("native", inputs, None, with_grad=False)
    torch.testing.assert_close(single, plain, rtol=0, atol=0)
    assert (packed - plain).abs().max() > 1e-2
    # Each document alone (sliced out of the row) gives its part of the packed result.
    q, k, v, sk, sv, lam, kpm = inputs
    start = 0
    for n in ROWS["odd"][0]:
        part = slice(start, start + n)
        alone = sinkdlm.sink_attention(
            q[:1, :, part], k[:1, :, part], v[:1, :, part], sk, sv, key_padding_mask=kpm[:1, part]
        )
        torch.testing.assert_close(packed[:1, :, part], alone, rtol=1e-12, atol=1e-12)
        start += n


@pytest.mark.parametrize("route", ["native", "composed"])
def test_non_contiguous_inputs_and_int32_ids(route):
    inputs, seg = make_inputs(ROWS["odd"], 4, 2, 16, "per_batch", True)
    q, k, v, sk, sv, lam, kpm = inputs
    # (B, L, H, D) projections viewed as heads, and a strided head dim
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    kt = torch.stack([k, -k], dim=-1)[..., 0]  # head dim of stride 2
    assert kt.stride(-1) == 2
    want, _, _ = run_route("reference", inputs, seg, with_grad=False)
    got = sinkdlm.sink_attention(
        qt, kt, v, sk, sv, key_padding_mask=kpm, segment_ids=seg.int(), backend=route
    )
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_gradcheck_float64():
    inputs, seg = make_inputs([[2, 1, 3], [6]], 2, 1, 4, "shared+logit", True)
    q, k, v, sk, sv, lam, kpm = (
        t.clone().requires_grad_() if t is not None and t.is_floating_point() else t for t in inputs
    )

    def f(q, k, v, sk, sv, lam):
        return sinkdlm.sink_attention(
            q, k, v, sk, sv, sink_logit=lam, key_padding_mask=kpm, segment_ids=seg, return_lse=True
        )

    assert torch.autograd.gradcheck(f, (q, k, v, sk, sv, lam), eps=1e-6, atol=1e-7)
    # double backward runs through the dense form, segments included
    assert torch.autograd.gradgradcheck(f, (q, k, v, sk, sv, lam), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "op", [torch.ops.sinkdlm.sink_attention_fwd, torch.ops.sinkdlm.sink_attention_composed_fwd]
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_opcheck(op, dtype):
    inputs, seg = make_inputs([[2, 1, 4], [7]], 4, 2, 8, "shared+logit", True, dtype)
    q, k, v, sk, sv, lam, kpm = inputs
    args = [t.requires_grad_() for t in (q, k, v, sk, sv, lam)]
    torch.library.opcheck(op.default, (*args, kpm, None, 0.3, seg))


def test_bad_segment_ids_raise_clear_errors():
    inputs, seg = make_inputs(ROWS["odd"], 4, 2, 16, "shared", False)
    q, k, v, sk, sv, _, _ = inputs

    def call(ids, **kw):
        return sinkdlm.sink_attention(q, k, v, sk, sv, segment_ids=ids, **kw)

    with pytest.raises(TypeError, match="segment_ids must be an int32 or int64 tensor"):
        call(seg.double())
    with pytest.raises(TypeError, match="segment_ids must be an int32 or int64 tensor"):
        call(seg.tolist())
    with pytest.raises(ValueError, match=r"segment_ids must be \(B, L\) = \(2, 37\)"):
        call(seg[:, :-1])
    backwards = seg.clone()
    backwards[1, 5] = -1
    with pytest.raises(ValueError, match="non-decreasing.*row 1, positions 4 and 5"):
        call(backwards)
    with pytest.raises(ValueError, match="needs as many queries as keys"):
        sinkdlm.sink_attention(q[:, :, :5], k, v, sk, sv, segment_ids=seg)
    # the op's own checks, for direct callers
    op = torch.ops.sinkdlm.sink_attention_fwd
    with pytest.raises(RuntimeError, match="non-decreasing"):
        op(q, k, v, sk, sv, None, None, None, 0.25, backwards)
    with pytest.raises(TypeError, match="int32 or int64"):
        op(q, k, v, sk, sv, None, None, None, 0.25, seg.float())
    with pytest.raises(RuntimeError, match=r"segment_ids must be \(B, L\)"):
        op(q, k, v, sk, sv, None, None, None, 0.25, seg[:1])


def test_packing_helpers():
    cu = torch.tensor([0, 3, 4, 4, 9], dtype=torch.int32)
    ids = segment_ids_from_cu_seqlens(cu)
    assert ids.tolist() == [[0, 0, 0, 1, 3, 3, 3, 3, 3]]
    assert segment_lengths(ids) == [[3, 1, 5]]
    positions = torch.tensor([[0, 1, 2, 0, 0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11, 12, 13]])
    got = segment_ids_from_position_ids(positions)
    assert got.tolist() == [[0, 0, 0, 1, 2, 2, 2, 2, 2], [0] * 9]
    with pytest.raises(ValueError, match="start at 0 and be non-decreasing"):
        segment_ids_from_cu_seqlens(torch.tensor([0, 3, 2]))
    with pytest.raises(ValueError, match="end at the row's length 8"):
        segment_ids_from_cu_seqlens(cu, total=8)
    with pytest.raises(TypeError, match="int32 or int64"):
        segment_ids_from_cu_seqlens(cu.float())
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        segment_ids_from_position_ids(positions[0])
