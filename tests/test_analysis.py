import importlib
import math

import pytest
import torch
from devices import devices

import sinkdlm
from sinkdlm.analysis import (
    AttentionRecorder,
    attention_mass,
    attention_mass_reference,
    detect_sinks,
    moving_sink_stats,
    plot_comparison,
    plot_sink_heatmap,
    plot_value_norms,
)
from sinkdlm.analysis.recorder import SinkTrace
from sinkdlm.models import DiffusionLM, variant_config

am_module = importlib.import_module("sinkdlm.analysis.attention_mass")
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
        monkeypatch.setattr(am_module, "_NATIVE_DEVICE_TYPES", frozenset())
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
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.sinkdlm.attention_mass(q.half(), k.half(), lse.half(), None, None, None, scale)


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


def test_detect_sinks_criteria():
    mass = torch.tensor([[0.5, 0.1, 0.1, 0.1, 0.1, 0.1], [0.2, 0.2, 0.15, 0.15, 0.15, 0.15]])
    ratio = detect_sinks(mass, method="ratio", epsilon=3.0)
    assert ratio.tolist() == [[True] + [False] * 5, [False] * 6]
    z = detect_sinks(mass, method="zscore", k=2.0)
    assert z.tolist() == [[True] + [False] * 5, [False] * 6]
    # a padded key is never a sink and does not enter the others' mean
    kpm = torch.tensor([[True] * 5 + [False], [True] * 6])
    padded = detect_sinks(torch.tensor([[0.35, 0.1, 0.1, 0.1, 0.1, 0.9]] * 2), key_padding_mask=kpm)
    assert padded.tolist() == [[True] + [False] * 5, [False] * 5 + [True]]
    with pytest.raises(ValueError, match="method must be"):
        detect_sinks(mass, method="max")


def test_detect_sinks_and_stats_name_the_bad_argument():
    """Issue 19: a wrong-shape mask gave a raw expand error, moving_sink_stats(None) an
    AttributeError."""
    mass = torch.rand(2, 6)
    with pytest.raises(ValueError, match=r"detect_sinks: key_padding_mask must be broadcastable "
                       r"to mass's shape \(2, 6\), got shape \(2, 5\)"):  # fmt: skip
        detect_sinks(mass, key_padding_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="detect_sinks: mass must be a floating"):
        detect_sinks(mass.tolist())
    with pytest.raises(TypeError, match="detect_sinks: epsilon must be a real number"):
        detect_sinks(mass, epsilon="3")
    with pytest.raises(TypeError, match=r"moving_sink_stats: trace must be a SinkTrace"):
        moving_sink_stats(None)


def synthetic_trace(positions):
    """One layer, one sequence, one head; a strong sink at positions[t] at step t (-1: none)."""
    t, n = len(positions), 8
    mass = torch.full((t, 1, 1, 1, n), 1.0 / n)
    for step, p in enumerate(positions):
        if p >= 0:
            mass[step, 0, 0, 0] = 0.3 / (n - 1)
            mass[step, 0, 0, 0, p] = 0.7
    return SinkTrace(
        mass=mass,
        sink_mass=torch.zeros(t, 1, 1, 1, 0),
        value_norm=torch.arange(n).float().expand(t, 1, 1, 1, n).clone(),
        sink_value_norm=torch.zeros(t, 1, 1, 0),
        input_ids=torch.zeros(t, 1, n, dtype=torch.long),
        key_padding_mask=torch.ones(t, 1, n, dtype=torch.bool),
        layers=[0],
    )


def test_moving_sink_stats_on_known_trajectory():
    stats = moving_sink_stats(synthetic_trace([2, 2, 5, 5, -1, 5, 1]))
    # pairs with a sink at both steps: (2,2) (2,5) (5,5) (5,1) -> 2 of 4 moved
    assert stats["move_rate"] == 0.5
    assert stats["distinct_positions"] == 3
    pos = torch.tensor([2, 2, 5, 5, 5, 1.0])
    assert stats["position_spread"] == pytest.approx(float(pos.std(unbiased=False)))
    assert stats["sink_rate"] == pytest.approx(6 / 7)
    assert math.isnan(stats["sink_token_share"])
    # value norm of key j is j: sinks are at 2,2,5,5,5,1
    assert stats["value_norm_sink"] == pytest.approx(sum([2, 2, 5, 5, 5, 1]) / 6)
    assert moving_sink_stats(synthetic_trace([3, 3, 3]))["move_rate"] == 0.0


SIZE = dict(vocab_size=41, mask_id=1, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2)


@pytest.mark.parametrize("variant", ["baseline", "sink1", "sink4", "sink_logit", "gate"])
def test_recorder_collects_consistent_trace(variant, tmp_path):
    torch.manual_seed(0)
    model = DiffusionLM(variant_config(variant, **SIZE)).eval()
    ids = torch.randint(2, 41, (2, 12))
    am = torch.ones(2, 12, dtype=torch.bool)
    am[1, 9:] = False
    with AttentionRecorder(model, layers=[0, 2]) as rec, torch.no_grad():
        x = torch.ones_like(ids)  # all masked
        for step in range(4):  # a toy unmasking trajectory, updated in place as samplers do
            model(x, attention_mask=am)
            x[:, step * 3 : step * 3 + 3] = ids[:, step * 3 : step * 3 + 3]
    assert all(m.attention_observer is None for m in model.attention_layers())
    trace = rec.trace()
    n_sinks = {"baseline": 0, "gate": 0, "sink1": 1, "sink4": 4, "sink_logit": 1}[variant]
    assert trace.mass.shape == (4, 2, 2, 4, 12)
    assert trace.sink_mass.shape == (4, 2, 2, 4, n_sinks)
    assert trace.input_ids.shape == (4, 2, 12) and (trace.input_ids[0] == 1).all()
    assert (trace.input_ids[2, :, :6] == ids[:, :6]).all() and (
        trace.input_ids[2, :, 6:] == 1
    ).all()
    # keys + designated sinks hold all attention of every head
    total = trace.mass.sum(-1) + trace.sink_mass.sum(-1)
    torch.testing.assert_close(total, torch.ones_like(total), rtol=1e-5, atol=1e-5)
    assert (trace.mass[:, :, 1, :, 9:] == 0).all()
    # value norms are those of the model's v projection (layer 0: embeddings only)
    x = model.layers[0].attn_norm(model.embed(trace.input_ids[0]))
    v = model.layers[0].attn.v_proj(x).view(2, 12, 2, 8).norm(dim=-1)
    torch.testing.assert_close(trace.value_norm[0, 0, :, 0], v[..., 0], rtol=1e-5, atol=1e-6)
    stats = moving_sink_stats(trace)
    assert (math.isnan(stats["sink_token_share"])) == (n_sinks == 0)
    table = trace.to_dict()
    assert len(table["step"]) == 4 * 2 * 2 * 4 and set(table["layer"]) == {0, 2}
    for fn in (plot_sink_heatmap, plot_value_norms):
        path = fn(trace, tmp_path / f"{fn.__name__}.png")
        assert path.stat().st_size > 5000
    both = plot_comparison({"a": trace, "b": trace}, tmp_path / "cmp.png", mask_id=1)
    assert both.stat().st_size > 10000


def test_recorder_max_steps_and_protocol():
    model = DiffusionLM(variant_config("sink1", **SIZE))
    with pytest.warns(UserWarning, match="max_steps"), AttentionRecorder(model, max_steps=2) as rec:
        for _ in range(3):
            model(torch.randint(2, 41, (1, 5)))
    assert rec.trace().num_steps == 2
    # Without the protocol the recorder watches SDPA calls: a model making none records nothing.
    linear = torch.nn.Linear(2, 2)
    with AttentionRecorder(linear) as rec:
        linear(torch.randn(1, 2))
    with pytest.raises(RuntimeError, match="recorded no step"):
        rec.trace()


def test_attention_mass_backward_raises():
    """Issue 19: without an autograd kernel, backward gave zero gradients with a warning."""
    (q, k, lse, sk, sl, kpm), scale = make_inputs(CASES[0], torch.float32, "cpu")
    q.requires_grad_()
    mass, sink_mass = attention_mass(q, k, lse, sk, scale=scale)
    with pytest.raises(NotImplementedError, match="attention_mass is not differentiable"):
        (mass.sum() + sink_mass.sum()).backward()
