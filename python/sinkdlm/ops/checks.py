"""Argument checks of the operators, shared by each op, its composite path and its reference.

Each raises a ValueError or TypeError naming the argument and what was expected. The native
kernels check again (csrc/*/*_ops.cpp) for callers of ``torch.ops.sinkdlm.*``.
"""

from __future__ import annotations

import math

import torch

from .. import _checks

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
STRATEGIES = ("low_confidence", "margin", "entropy", "random")


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


# ---- sink_attention ---------------------------------------------------------------------------


def _fail(name: str, expected: str, got: object, exc: type[Exception] = ValueError):
    raise exc(f"sink_attention: {name} must be {expected}, got {got}")


def _check_padding(name, mask, shape, what, device):
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        _fail(name, "a bool tensor (True = real token)", getattr(mask, "dtype", mask), TypeError)
    if _shape(mask) != shape:
        _fail(name, f"{what} = {shape}", f"shape {_shape(mask)}")
    if mask.device != device:
        _fail(name, f"on {device} like q", mask.device)


def check_segment_ids(segment_ids, batch, q_len, k_len, device, fn="sink_attention"):
    """Packed rows' segment ids: int32 / int64 ``(B, L)`` on ``device``, ``Lq == Lk``, and
    non-decreasing along each row (one run of equal ids per document; a host sync, skipped
    under torch.compile's tracing)."""
    if not isinstance(segment_ids, torch.Tensor) or segment_ids.dtype not in (
        torch.int32,
        torch.int64,
    ):
        got = getattr(segment_ids, "dtype", type(segment_ids).__name__)
        raise TypeError(f"{fn}: segment_ids must be an int32 or int64 tensor, got {got}")
    if q_len != k_len:
        raise ValueError(
            f"{fn}: segment_ids needs as many queries as keys (the same tokens), got Lq = {q_len} "
            f"and Lk = {k_len}"
        )
    if _shape(segment_ids) != (batch, q_len):
        raise ValueError(
            f"{fn}: segment_ids must be (B, L) = ({batch}, {q_len}), got shape "
            f"{_shape(segment_ids)}"
        )
    if segment_ids.device != device:
        raise ValueError(f"{fn}: segment_ids must be on {device} like q, got {segment_ids.device}")
    if torch.compiler.is_compiling() or q_len < 2:
        return
    falls = segment_ids[:, 1:] < segment_ids[:, :-1]
    if bool(falls.any()):
        row, col = (int(i) for i in falls.nonzero()[0])
        raise ValueError(
            f"{fn}: segment_ids must be non-decreasing along each row (one run of equal ids per "
            f"document), got {int(segment_ids[row, col])} then {int(segment_ids[row, col + 1])} "
            f"at row {row}, positions {col} and {col + 1}"
        )


def check_sink_attention_args(
    q,
    k,
    v,
    sink_k,
    sink_v,
    sink_logit,
    key_padding_mask,
    scale,
    query_padding_mask=None,
    segment_ids=None,
):
    """The arguments of :func:`sinkdlm.sink_attention` (see its docstring)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            _fail(name, "a torch.Tensor", type(t).__name__, TypeError)
        if t.dim() != 4:
            _fail(name, "4-D (B, H, L, D)", f"shape {_shape(t)}")
    if q.dtype not in FLOAT_DTYPES:
        _fail("q", "float32, float64, float16 or bfloat16", q.dtype, TypeError)
    B, H, Lq, D = q.shape
    if D == 0:
        _fail("q", "a non-empty head dim", f"shape {_shape(q)}")
    if k.shape[0] != B or k.shape[3] != D:
        _fail("k", f"(B, Hkv, Lk, D) = ({B}, Hkv, Lk, {D}) to match q", f"shape {_shape(k)}")
    L = k.shape[2]
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            _fail(name, f"{q.dtype} like q", t.dtype, TypeError)
        if t.device != q.device:
            _fail(name, f"on {q.device} like q", t.device)
    if k.shape != v.shape:
        _fail("v", f"the shape of k {_shape(k)}", f"shape {_shape(v)}")
    Hkv = k.shape[1]
    if Hkv == 0 or H % Hkv != 0:
        _fail("k", f"a head count dividing q's H = {H} (GQA)", f"Hkv = {Hkv}")
    if (sink_k is None) != (sink_v is None):
        given, missing = ("sink_k", "sink_v") if sink_v is None else ("sink_v", "sink_k")
        raise ValueError(
            f"sink_attention: {given} was given without {missing}; pass both or neither"
        )
    if sink_k is not None:
        for name, t in (("sink_k", sink_k), ("sink_v", sink_v)):
            if not isinstance(t, torch.Tensor):
                _fail(name, "a torch.Tensor", type(t).__name__, TypeError)
            if t.dtype != q.dtype:
                _fail(name, f"{q.dtype} like q", t.dtype, TypeError)
            if t.device != q.device:
                _fail(name, f"on {q.device} like q", t.device)
            if _shape(t) not in ((Hkv, D), (B, Hkv, D)):
                _fail(
                    name,
                    f"(Hkv, D) = ({Hkv}, {D}) or (B, Hkv, D) = ({B}, {Hkv}, {D})",
                    f"shape {_shape(t)}",
                )
        if sink_k.shape != sink_v.shape:
            _fail("sink_v", f"the shape of sink_k {_shape(sink_k)}", f"shape {_shape(sink_v)}")
    if sink_logit is not None:
        if not isinstance(sink_logit, torch.Tensor) or not sink_logit.is_floating_point():
            _fail(
                "sink_logit",
                "a floating-point tensor",
                getattr(sink_logit, "dtype", sink_logit),
                TypeError,
            )
        if _shape(sink_logit) != (H,):
            _fail("sink_logit", f"(H,) = ({H},)", f"shape {_shape(sink_logit)}")
        if sink_logit.device != q.device:
            _fail("sink_logit", f"on {q.device} like q", sink_logit.device)
    if key_padding_mask is not None:
        _check_padding("key_padding_mask", key_padding_mask, (B, L), "(B, Lk)", q.device)
    if query_padding_mask is not None:
        _check_padding("query_padding_mask", query_padding_mask, (B, Lq), "(B, Lq)", q.device)
    if segment_ids is not None:
        check_segment_ids(segment_ids, B, Lq, L, q.device)
    _checks.softmax_scale("sink_attention", scale, q.dtype)


# ---- attention_mass ---------------------------------------------------------------------------


def check_attention_mass_args(q, k, lse, sink_k, sink_logit, key_padding_mask, scale):
    """The arguments of :func:`sinkdlm.analysis.attention_mass` (see its docstring)."""

    def fail(name, expected, got, exc=ValueError):
        _checks.fail("attention_mass", name, expected, got, exc)

    tensors = (("q", q), ("k", k), ("lse", lse), ("sink_k", sink_k), ("sink_logit", sink_logit))
    for name, t in tensors:
        if t is not None and not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            fail(name, "a floating-point tensor", _checks.describe(t), TypeError)
    if q.dim() != 4:
        fail("q", "(B,H,L,D)", f"shape {_shape(q)}")
    b, h, n, d = q.shape
    if k.dim() != 4 or k.shape[0] != b or k.shape[2:] != (n, d) or not k.shape[1] or h % k.shape[1]:
        fail("k", f"(B,Hkv,L,D) with Hkv >= 1 dividing H for q {_shape(q)}", _shape(k))
    if lse.shape != (b, h, n):
        fail("lse", f"(B,H,L) = {(b, h, n)}", _shape(lse))
    if sink_k is not None and sink_k.shape not in ((k.shape[1], d), (b, k.shape[1], d)):
        expected = f"(Hkv,D) or (B,Hkv,D) = {(k.shape[1], d)} or {(b, k.shape[1], d)}"
        fail("sink_k", expected, _shape(sink_k))
    if sink_logit is not None and sink_logit.shape != (h,):
        fail("sink_logit", f"(H,) = ({h},)", _shape(sink_logit))
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            fail("key_padding_mask", "a bool tensor", _checks.describe(key_padding_mask), TypeError)
        if key_padding_mask.shape != (b, n):
            fail("key_padding_mask", f"(B,L) = {(b, n)}", _shape(key_padding_mask))
    _checks.softmax_scale("attention_mass", scale, q.dtype)
    for name, t in (*tensors[1:], ("key_padding_mask", key_padding_mask)):
        if t is not None and t.device != q.device:
            fail(name, f"on q's device {q.device}", t.device)


# ---- remask_step ------------------------------------------------------------------------------


def normalize_remask_step_args(
    fn,
    logits,
    x,
    mask_id,
    num_transfer,
    window,
    temperature,
    threshold,
    generator,
    count_floor=False,
    position_offset=0,
):
    """The Python-level arguments of :func:`sinkdlm.remask_step` and its reference as the op
    takes them: ``(mask_id, num_transfer, temperature, threshold, count_floor,
    position_offset)``, with ``num_transfer`` a (B,) int64 tensor (a Python or NumPy int means
    every row). Checks what the op cannot (types
    of Python scalars, the generator) or cannot everywhere (devices: meta logits would send a
    CPU x to the fake kernel); shapes, dtypes and values of the tensors are the op's to check
    (:func:`check_remask_step_args` for the composite)."""
    for name, t in (("logits", logits), ("x", x)):
        if not isinstance(t, torch.Tensor):
            _checks.fail(fn, name, "a torch.Tensor", _checks.describe(t), TypeError)
    if logits.dim() != 3:
        _checks.fail(fn, "logits", "(B, L, V)", f"shape {_shape(logits)}")
    batch, _, vocab = logits.shape
    mask_id = _checks.integer(fn, "mask_id", mask_id, 0, vocab - 1)
    if not isinstance(num_transfer, torch.Tensor):
        expected = "an int or a (B,) int64 tensor"
        count = _checks.integer(fn, "num_transfer", num_transfer, 0, expected=expected)
        num_transfer = torch.full((batch,), count, dtype=torch.int64, device=logits.device)
    for name, t in (("x", x), ("num_transfer", num_transfer), ("window", window)):
        if t is not None and not isinstance(t, torch.Tensor):
            _checks.fail(fn, name, "a torch.Tensor", _checks.describe(t), TypeError)
        if t is not None and t.device != logits.device:
            _checks.fail(fn, name, f"on the logits' device {logits.device}", t.device)
    temperature = _checks.real(fn, "temperature", temperature, low=0)
    if threshold is not None:
        threshold = _checks.real(fn, "threshold", threshold, allow_infinite=True)
    _checks.generator(fn, generator)
    if not isinstance(count_floor, bool):
        _checks.fail(fn, "count_floor", "a bool", _checks.describe(count_floor), TypeError)
    position_offset = _checks.integer(fn, "position_offset", position_offset, 0)
    return mask_id, num_transfer, temperature, threshold, count_floor, position_offset


def check_remask_step_args(
    logits,
    x,
    mask_id,
    num_transfer,
    window,
    strategy,
    temperature,
    threshold,
    count_floor=False,
    position_offset=0,
):
    """The arguments of :func:`sinkdlm.remask_step` (see its docstring), ``num_transfer`` as a
    tensor; the same checks and messages as the native op's (csrc/remask/remask_step_ops.cpp).
    Reads ``num_transfer`` and ``window`` on the host."""

    def fail(message, exc=ValueError):
        raise exc(f"remask_step: {message}")

    for name, t in (("logits", logits), ("x", x), ("num_transfer", num_transfer)):
        if not isinstance(t, torch.Tensor):
            fail(f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
    if logits.dim() != 3:
        fail(f"logits must be (B, L, V), got shape {_shape(logits)}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        fail(f"logits must be float32, float16 or bfloat16, got {logits.dtype}", TypeError)
    batch, length, vocab = logits.shape
    if vocab == 0:
        fail("logits must have a non-empty vocabulary (V > 0)")
    if _shape(x) != (batch, length):
        fail(f"x must be (B, L) = ({batch}, {length}) like logits, got shape {_shape(x)}")
    if x.dtype != torch.int64:
        fail(f"x must be int64, got {x.dtype}", TypeError)
    if _shape(num_transfer) != (batch,):
        fail(f"num_transfer must be (B,) = ({batch},), got shape {_shape(num_transfer)}")
    if num_transfer.dtype != torch.int64:
        fail(f"num_transfer must be int64, got {num_transfer.dtype}", TypeError)
    if x.device != logits.device or num_transfer.device != logits.device:
        fail(
            f"x and num_transfer must be on the logits' device {logits.device}, got {x.device} "
            f"and {num_transfer.device}"
        )
    if not 0 <= mask_id < vocab:
        fail(f"mask_id must be in [0, V = {vocab}), got {mask_id}")
    if strategy not in STRATEGIES:
        fail(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not (math.isfinite(temperature) and temperature >= 0):
        fail(f"temperature must be finite and >= 0, got {temperature}")
    if threshold is not None and math.isnan(threshold):
        fail("threshold must be a number, got nan")
    if count_floor and threshold is None:
        fail(
            "count_floor needs a threshold (it makes num_transfer a floor under threshold "
            "decoding), got threshold=None"
        )
    if not 0 <= position_offset <= 2**32 - 1 - length:
        fail(
            f"position_offset must be >= 0 with position_offset + L < 2^32, got "
            f"{position_offset} for L = {length}"
        )
    counts = num_transfer.cpu()
    if batch and counts.min() < 0:
        row = int((counts < 0).nonzero()[0, 0])
        fail(f"num_transfer must be >= 0, got {int(counts[row])} in row {row}")
    if window is None:
        return
    if not isinstance(window, torch.Tensor):
        fail(f"window must be a torch.Tensor, got {type(window).__name__}", TypeError)
    if _shape(window) != (batch, 2):
        fail(f"window must be (B, 2) = ({batch}, 2), got shape {_shape(window)}")
    if window.dtype != torch.int64:
        fail(f"window must be int64, got {window.dtype}", TypeError)
    if window.device != logits.device:
        fail(f"window must be on the logits' device {logits.device}, got {window.device}")
    for row, (start, end) in enumerate(window.cpu().tolist()):
        if not 0 <= start <= end <= length:
            fail(
                f"window rows must satisfy 0 <= start <= end <= L = {length}, got [{start}, "
                f"{end}) in row {row}"
            )
