"""sinkdlm.remask_step against the plain-PyTorch reference (LLaDA's way, float64 softmax)."""

import importlib

import numpy as np
import pytest
import torch
from conftest import devices

import sinkdlm

remask_module = importlib.import_module("sinkdlm.ops.remask_step")

STRATEGIES = ["low_confidence", "margin", "entropy", "random"]


DEVICES = devices()


def make_inputs(batch, length, vocab, dtype, device, seed=0):
    """Random logits and tokens where row 0 has no mask at all, row 1 few masks and
    the others a mix; num_transfer asks for more than some rows have."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, length, vocab, generator=g) * 3).to(dtype)
    mask_id = vocab - 2
    x = torch.randint(0, vocab - 2, (batch, length), generator=g)
    x[torch.rand(batch, length, generator=g) < 0.6] = mask_id
    x[0] = torch.randint(0, vocab - 2, (length,), generator=g)  # no masks
    if batch > 1:
        x[1] = 5
        x[1, : min(2, length)] = mask_id  # fewer masks than asked
    num_transfer = torch.randint(0, length + 2, (batch,), generator=g)
    if batch > 1:
        num_transfer[1] = length
    starts = torch.randint(0, length + 1, (batch,), generator=g)
    ends = starts + (torch.rand(batch, generator=g) * (length - starts + 1)).long()
    window = torch.stack([starts, ends], dim=1)
    return logits.to(device), x.to(device), mask_id, num_transfer.to(device), window.to(device)


def assert_same_step(got, want):
    x_new, transferred, confidence = got
    ref_x_new, ref_transferred, ref_confidence = want
    assert x_new.dtype == torch.int64 and transferred.dtype == torch.bool
    assert confidence.dtype == torch.float32
    torch.testing.assert_close(x_new.cpu(), ref_x_new.cpu(), rtol=0, atol=0)
    torch.testing.assert_close(transferred.cpu(), ref_transferred.cpu(), rtol=0, atol=0)
    torch.testing.assert_close(confidence.cpu(), ref_confidence.cpu(), rtol=1e-5, atol=1e-6)


def run_both(logits, x, mask_id, num_transfer, seed=123, **kwargs):
    got = sinkdlm.remask_step(
        logits, x, mask_id, num_transfer, generator=torch.Generator().manual_seed(seed), **kwargs
    )
    want = sinkdlm.remask_step_reference(
        logits, x, mask_id, num_transfer, generator=torch.Generator().manual_seed(seed), **kwargs
    )
    return got, want


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("use_window", [False, True])
@pytest.mark.parametrize("threshold", [None, "mid"])
def test_matches_reference(device, strategy, temperature, use_window, threshold):
    # V = 4101: not a multiple of any vector width, several CPU chunks.
    logits, x, mask_id, num_transfer, window = make_inputs(5, 13, 4101, torch.float32, device)
    if threshold == "mid":  # a threshold some but not all positions pass
        conf = sinkdlm.remask_step_reference(logits, x, mask_id, 0, strategy=strategy)[2]
        threshold = conf[torch.isfinite(conf)].median().item()
    got, want = run_both(
        logits,
        x,
        mask_id,
        num_transfer,
        strategy=strategy,
        temperature=temperature,
        threshold=threshold,
        window=window if use_window else None,
    )
    assert_same_step(got, want)
    assert not got[1][0].any(), "a row without masks got a position filled"
    assert (got[1].sum(1) <= (x == mask_id).sum(1)).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 7, 300])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_half_precision_and_small_vocab(device, dtype, vocab, strategy):
    batch, length = 3, 9
    g = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(batch, length, vocab, generator=g) * 4).to(dtype).to(device)
    x = torch.zeros(batch, length, dtype=torch.int64)
    x[torch.rand(batch, length, generator=g) < 0.7] = vocab - 1
    num_transfer = torch.tensor([1, 3, 20])
    got, want = run_both(
        logits, x.to(device), vocab - 1, num_transfer.to(device), strategy=strategy, temperature=0.5
    )
    assert_same_step(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", ["low_confidence", "margin", "entropy"])
def test_bfloat16_ties(device, strategy):
    # Integer-valued bfloat16 logits: argmax ties (lowest token wins) and, since positions
    # repeat one of three rows, exact confidence ties (lowest position wins).
    g = torch.Generator().manual_seed(7)
    rows = torch.randint(-3, 4, (3, 4099), generator=g).to(torch.bfloat16)
    pick = torch.randint(0, 3, (2, 17), generator=g)
    logits = rows[pick].to(device)
    assert (logits == logits.max(-1, keepdim=True).values).sum(-1).min() > 1
    mask_id = 4098
    x = torch.full((2, 17), mask_id, dtype=torch.int64)
    x[:, ::5] = 11
    got, want = run_both(
        logits, x.to(device), mask_id, torch.tensor([4, 9], device=device), strategy=strategy
    )
    assert_same_step(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(device):
    logits, x, mask_id, num_transfer, window = make_inputs(4, 11, 517, torch.float32, device, 3)
    strided_logits = logits.transpose(0, 1).contiguous().transpose(0, 1)  # batch-strided
    vocab_strided = torch.cat([logits, logits], dim=2)[..., ::2]  # vocabulary stride 2
    strided_x = x.t().contiguous().t()
    for lg in (strided_logits, vocab_strided):
        got = sinkdlm.remask_step(lg, strided_x, mask_id, num_transfer, window=window)
        want = sinkdlm.remask_step_reference(lg, x, mask_id, num_transfer, window=window)
        assert_same_step(got, want)


def test_generator_reproducibility():
    logits, x, mask_id, num_transfer, _ = make_inputs(3, 20, 300, torch.float32, "cpu")

    def step(seed):
        generator = torch.Generator().manual_seed(seed)
        return sinkdlm.remask_step(
            logits, x, mask_id, num_transfer, temperature=2.0, generator=generator
        )

    first, again, other = step(5), step(5), step(6)
    assert torch.equal(first[0], again[0])
    assert not torch.equal(first[0], other[0])


def test_noise_is_gumbel_and_shape_independent():
    gumbel, uniform = sinkdlm.remask_step_noise(99, 3, 4, 50, 1000)
    assert gumbel.shape == (4, 50, 1000) and uniform.shape == (4, 50)
    # Gumbel(0, 1): mean = Euler-Mascheroni constant, variance pi^2 / 6.
    assert abs(gumbel.double().mean().item() - 0.5772) < 0.01
    assert abs(gumbel.double().var().item() - 1.6449) < 0.03
    assert 0 < uniform.min() and uniform.max() < 1
    small_gumbel, small_uniform = sinkdlm.remask_step_noise(99, 3, 2, 7, 33)
    assert torch.equal(small_gumbel, gumbel[:2, :7, :33])
    assert torch.equal(small_uniform, uniform[:2, :7])
    assert not torch.equal(sinkdlm.remask_step_noise(99, 4, 2, 7, 33)[0], small_gumbel)


def test_temperature_samples_softmax():
    # One position, many seeds: token frequencies follow softmax(logits / T).
    logits = torch.tensor([[[0.0, 1.0, 2.0, -1.0, 0.5]]])
    x = torch.tensor([[4]])
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(5)
    for _ in range(4000):
        token = sinkdlm.remask_step(logits, x, 4, 1, temperature=1.5, generator=gen)[0]
        counts[token] += 1
    expected = torch.softmax(logits[0, 0] / 1.5, -1)
    torch.testing.assert_close(counts / counts.sum(), expected, atol=0.03, rtol=0)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(logits=a["logits"][0]), "logits must be"),
        (lambda a: a.update(logits=a["logits"].double()), "float32, float16 or bfloat16"),
        (lambda a: a.update(x=a["x"][:, :-1]), "x must be"),
        (lambda a: a.update(x=a["x"].int()), "x must be int64"),
        (lambda a: a.update(num_transfer=torch.tensor([1, -1])), "num_transfer must be >= 0"),
        (lambda a: a.update(num_transfer=torch.tensor([1])), "num_transfer must be"),
        (lambda a: a.update(mask_id=50), "mask_id must be an int with 0 <= mask_id <= 49"),
        (lambda a: a.update(mask_id=-1), "mask_id must be an int with 0 <= mask_id <= 49"),
        (lambda a: a.update(window=torch.tensor([[0, 7], [2, 1]])), "window rows"),
        (lambda a: a.update(window=torch.tensor([[0, 8], [0, 2]])), "window rows"),
        (lambda a: a.update(window=torch.tensor([0, 2])), "window must be"),
        (lambda a: a.update(strategy="topk"), "strategy must be one of"),
        (lambda a: a.update(temperature=-1.0), "temperature must be"),
    ],
)
@pytest.mark.parametrize("route", ["native", "composite"])
def test_bad_input_raises(change, message, route, monkeypatch):
    errors = (ValueError, TypeError, RuntimeError)
    if route == "composite":  # a device without a kernel: the Python checks, same messages
        monkeypatch.setattr(remask_module, "has_native_kernel", lambda op, device_type: False)
        errors = (ValueError, TypeError)
    args = dict(
        logits=torch.randn(2, 7, 50),
        x=torch.full((2, 7), 3),
        mask_id=3,
        num_transfer=torch.tensor([1, 2]),
        window=None,
        strategy="low_confidence",
        temperature=0.0,
    )
    change(args)
    with pytest.raises(errors, match=message):
        sinkdlm.remask_step(
            args["logits"],
            args["x"],
            args["mask_id"],
            args["num_transfer"],
            window=args["window"],
            strategy=args["strategy"],
            temperature=args["temperature"],
        )


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("threshold", [None, 0.05])
def test_composite_route_matches_native_kernel(strategy, temperature, threshold, monkeypatch):
    """Devices without a kernel run the composite: the kernel's results, noise included."""
    logits, x, mask_id, num_transfer, window = make_inputs(4, 11, 1031, torch.bfloat16, "cpu", 2)
    kwargs = dict(strategy=strategy, temperature=temperature, threshold=threshold, window=window)
    native = sinkdlm.remask_step(
        logits, x, mask_id, num_transfer, generator=torch.Generator().manual_seed(3), **kwargs
    )
    monkeypatch.setattr(remask_module, "has_native_kernel", lambda op, device_type: False)
    composite = sinkdlm.remask_step(
        logits, x, mask_id, num_transfer, generator=torch.Generator().manual_seed(3), **kwargs
    )
    assert_same_step(composite, native)
    assert composite[1].any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("threshold", [None, 0.1])
def test_opcheck(device, threshold):
    logits, x, mask_id, num_transfer, window = make_inputs(3, 8, 97, torch.bfloat16, device)
    args = (logits, x, mask_id, num_transfer, window, "margin", 0.5, threshold, 1234, 2)
    torch.library.opcheck(torch.ops.sinkdlm.remask_step.default, args)


def test_opcheck_noise():
    torch.library.opcheck(torch.ops.sinkdlm.remask_step_noise.default, (77, 5, 2, 3, 41))


def test_torch_compile_fullgraph():
    logits, x, mask_id, num_transfer, window = make_inputs(2, 6, 64, torch.float32, "cpu")

    def step(logits, x, num_transfer, window):
        return sinkdlm.remask_step(logits, x, mask_id, num_transfer, window=window)

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    assert_same_step(
        compiled(logits, x, num_transfer, window), step(logits, x, num_transfer, window)
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_minus_infinity_logits(device, strategy):
    # Vocabulary entries a model rules out (logit -inf) get probability 0 and add 0 to entropy.
    logits, x, mask_id, num_transfer, window = make_inputs(4, 9, 3001, torch.float32, device, 5)
    g = torch.Generator().manual_seed(1)
    logits[torch.rand(logits.shape, generator=g).to(device) < 0.3] = float("-inf")
    logits[1, :, :2500] = float("-inf")  # whole leading chunks (CPU) and threads (CUDA) at -inf
    got, want = run_both(logits, x, mask_id, num_transfer, strategy=strategy, temperature=0.9)
    assert_same_step(got, want)
    assert torch.isfinite(got[2][x == mask_id]).all()


@pytest.mark.parametrize("step", [sinkdlm.remask_step, sinkdlm.remask_step_reference])
def test_python_and_numpy_integer_counts_are_accepted(step):
    """Issue 19: np.int64(2) gave "Expected a value of type 'Tensor' for argument
    'num_transfer'"."""
    logits, x, mask_id, _, _ = make_inputs(2, 9, 40, torch.float32, "cpu")
    want = step(logits, x, mask_id, torch.tensor([2, 2]))
    for count in (2, np.int64(2), np.int32(2)):
        for a, b in zip(step(logits, x, np.int64(mask_id), count), want, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("step", [sinkdlm.remask_step, sinkdlm.remask_step_reference])
@pytest.mark.parametrize(
    "override, exc, pattern",
    [
        (dict(num_transfer=2.0), TypeError,
         r"num_transfer must be an int or a \(B,\) int64 tensor, got float 2.0"),
        (dict(num_transfer=-1), ValueError, r"num_transfer must be an int with 0 <= num_transfer"),
        (dict(mask_id=2**70), ValueError, r"mask_id must be an int with 0 <= mask_id <= 49, got"),
        (dict(mask_id=3.0), TypeError, r"mask_id must be an int, got float 3.0"),
        (dict(generator=5), TypeError, r"generator must be a torch.Generator or None, got int 5"),
        (dict(temperature="0.5"), TypeError, r"temperature must be a real number, got str"),
        (dict(temperature=float("inf")), ValueError, r"temperature must be a finite number"),
        (dict(threshold=float("nan")), ValueError, r"threshold must be a finite number, got nan"),
        (dict(threshold=True), TypeError, r"threshold must be a real number, got bool"),
        (dict(x=[[3, 3]]), TypeError, r"x must be a torch.Tensor, got list"),
        (dict(logits=torch.randn(2, 7, 50, device="meta")), ValueError,
         r"x must be on the logits' device meta, got cpu"),
        (dict(window=torch.zeros(2, 2, dtype=torch.int64, device="meta")), ValueError,
         r"window must be on the logits' device cpu, got meta"),
    ],
)  # fmt: skip
def test_bad_arguments_are_named(step, override, exc, pattern):
    """Issue 19: mask_id=2**70 failed with "Expected 'int' ... found type 'int'", generator=5
    with an AttributeError, and meta logits with a CPU x returned uninitialised CPU tensors."""
    name = step.__name__
    args = dict(logits=torch.randn(2, 7, 50), x=torch.full((2, 7), 3), mask_id=3, num_transfer=1)
    args.update(override)
    with pytest.raises(exc, match=f"{name}: {pattern}"):
        step(args.pop("logits"), args.pop("x"), args.pop("mask_id"), args.pop("num_transfer"),
             **args)  # fmt: skip


def test_fake_kernel_checks_devices():
    """The op called directly (as torch.compile does) must refuse mixed devices too."""
    logits = torch.randn(2, 7, 50, device="meta")
    x, count = torch.full((2, 7), 3), torch.ones(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="remask_step: x must be on the logits' device meta"):
        torch.ops.sinkdlm.remask_step(logits, x, 3, count, None, "margin", 0.0, None, 0, 0)


def test_backward_through_confidence_raises():
    """Issue 19: without an autograd kernel, backward gave zero gradients with a warning."""
    logits, x, mask_id, num_transfer, _ = make_inputs(2, 6, 30, torch.float32, "cpu")
    logits.requires_grad_()
    confidence = sinkdlm.remask_step(logits, x, mask_id, num_transfer)[2]
    with pytest.raises(NotImplementedError, match="remask_step is not differentiable"):
        confidence[torch.isfinite(confidence)].sum().backward()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_plus_infinity_logits_share_the_probability(device, strategy, temperature):
    """Issue 19: a +inf logit gave confidence NaN (not 1) and its position was not picked. Rule
    (kernels and reference): n entries at +inf share the probability, 1/n each."""
    logits, x, mask_id, _, _ = make_inputs(2, 9, 3001, torch.float32, device, 11)
    x[:] = mask_id
    logits[0, 3, 2500] = float("inf")  # one +inf, in the second CPU chunk
    logits[0, 5, [7, 2900]] = float("inf")  # two: they share it, the lower id is chosen
    logits[1, :, 100] = float("-inf")
    num_transfer = torch.tensor([1, 2], device=device)
    got, want = run_both(
        logits, x, mask_id, num_transfer, strategy=strategy, temperature=temperature
    )
    assert_same_step(got, want)
    x_new, transferred, confidence = (t.cpu() for t in got)
    assert x_new[0, 3] == 2500 and x_new[0, 5] == 7 or not transferred[0, [3, 5]].all()
    expected = {"low_confidence": (1.0, 0.5), "margin": (1.0, 0.0), "entropy": (0.0, -0.6931472)}
    if strategy in expected:
        one, two = expected[strategy]
        assert confidence[0, 3] == pytest.approx(one) and confidence[0, 5] == pytest.approx(two)
        assert transferred[0, 3] and transferred[0].sum() == 1  # the certain position first
    assert torch.isfinite(confidence).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("step", [sinkdlm.remask_step, sinkdlm.remask_step_reference])
@pytest.mark.parametrize("bad", ["nan", "all_minus_inf"])
@pytest.mark.parametrize("strategy", ["low_confidence", "random"])
def test_undefined_distributions_raise(device, step, bad, strategy):
    """Issue 19: NaN logits were skipped by the fused argmax (and ranked by their sign bit). A
    position to fill with a NaN logit, or with every logit -inf, has no distribution: raise."""
    logits, x, mask_id, _, _ = make_inputs(2, 6, 2100, torch.bfloat16, device, 12)
    x[:] = mask_id
    x[1, 4] = 0  # not to fill: anything goes there
    logits[1, 4] = float("nan")
    kwargs = dict(strategy=strategy, generator=torch.Generator().manual_seed(0))
    step(logits, x, mask_id, 1, **kwargs)  # fine: the NaN sits where nothing is filled
    if bad == "nan":
        logits[1, 2, 2050] = float("nan")
    else:
        logits[1, 2] = float("-inf")
    with pytest.raises(ValueError, match=r"remask_step: logits must be free of NaN .*\(b=1, l=2\)"):
        step(logits, x, mask_id, 1, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("step", [sinkdlm.remask_step, sinkdlm.remask_step_reference])
def test_threshold_is_inclusive(device, step):
    """Issue 19: turning the threshold's >= into > passed every test. Two equal top logits give
    a confidence of exactly 0.5; a threshold of 0.5 must take those positions."""
    logits = torch.full((1, 4, 8), float("-inf"))
    logits[0, :, 1] = logits[0, :, 2] = 2.0  # low_confidence = 0.5 exactly, in any precision
    logits[0, 0, 3] = 5.0  # position 0: the most confident, taken by the count
    logits[0, 3, 1] = 2.5  # position 3: above the threshold
    x = torch.full((1, 4), 7)
    got = step(logits.to(device), x.to(device), 7, 1, threshold=0.5)[1:]
    transferred, confidence = (t.cpu() for t in got)
    assert confidence[0, 1] == 0.5 and confidence[0, 2] == 0.5
    assert transferred.tolist() == [[True, True, True, True]]
    strict = step(logits.to(device), x.to(device), 7, 1, threshold=0.5000001)[1].cpu()
    assert strict.tolist() == [[True, False, False, True]]
