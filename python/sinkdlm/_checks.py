"""Argument checks shared by the public functions: each failure is a ValueError (bad value) or
TypeError (bad type) that names the function, the argument, what was expected and what came."""

from __future__ import annotations

import math
import numbers
import operator

import torch


def fail(fn: str, name: str, expected: str, got: object, exc: type[Exception] = ValueError):
    raise exc(f"{fn}: {name} must be {expected}, got {got}")


def describe(value: object) -> str:
    """``type value`` for scalars (so 0.25 the float and 0.25 the numpy.float32 differ)."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"


def integer(
    fn: str,
    name: str,
    value,
    minimum: int | None = None,
    maximum: int | None = None,
    expected: str = "an int",
):
    """``value`` as a Python int: ints and NumPy integers (anything with ``__index__``), not bool.

    ``minimum`` / ``maximum`` are inclusive bounds; ``expected`` names the accepted types.
    """
    if isinstance(value, bool) or isinstance(value, torch.Tensor):
        fail(fn, name, expected, describe(value), TypeError)
    try:
        value = operator.index(value)
    except TypeError:
        fail(fn, name, expected, describe(value), TypeError)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        lo = "" if minimum is None else f"{minimum} <= "
        hi = "" if maximum is None else f" <= {maximum}"
        fail(fn, name, f"an int with {lo}{name}{hi}", value)
    return value


def real(
    fn: str,
    name: str,
    value,
    low=None,
    high=None,
    low_open=False,
    high_open=False,
    allow_infinite=False,
):
    """``value`` as a Python float: ints, floats, NumPy floats, not bool; never NaN, finite
    unless ``allow_infinite``; bounds optional (closed unless ``low_open`` / ``high_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        fail(fn, name, "a real number", describe(value), TypeError)
    value = float(value)
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if allow_infinite and math.isinf(value) and not (below or above):
        return value
    if not math.isfinite(value) or below or above:
        lo = "" if low is None else f"{low} {'<' if low_open else '<='} "
        hi = "" if high is None else f" {'<' if high_open else '<='} {high}"
        fail(fn, name, "a finite number" + (f" with {lo}{name}{hi}" if lo or hi else ""), value)
    return value


def generator(fn: str, value) -> torch.Generator | None:
    if value is not None and not isinstance(value, torch.Generator):
        fail(fn, "generator", "a torch.Generator or None", describe(value), TypeError)
    return value


def token_ids(fn: str, name: str, ids, vocab_size: int | None) -> None:
    """``ids`` an integer tensor whose values (when ``vocab_size`` is known) lie in [0, V)."""
    if not isinstance(ids, torch.Tensor):
        fail(fn, name, "an int64 tensor of token ids", describe(ids), TypeError)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        fail(fn, name, "an integer tensor of token ids", ids.dtype, TypeError)
    if vocab_size is not None and ids.numel() and ids.device.type != "meta":
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            fail(
                fn, name, f"token ids in [0, vocab_size = {vocab_size})", f"ids in [{low}, {high}]"
            )


def vocab_size_of(model) -> int | None:
    """The vocabulary size a model declares (``model.config.vocab_size``: Hugging Face models
    and the zoo's DiffusionLM), or None for a plain callable."""
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def mask_id(fn: str, value, vocab_size: int | None) -> int:
    """A mask token id: an int in [0, vocab_size) (just >= 0 when the size is unknown)."""
    maximum = None if vocab_size is None else vocab_size - 1
    return integer(fn, "mask_id", value, minimum=0, maximum=maximum)


def softmax_scale(fn: str, scale, dtype: torch.dtype) -> None:
    """A score scale: None or a real number, finite in the accumulation dtype the kernels use
    (float64 for float64 inputs, float32 otherwise: 1e300 would round to inf there)."""
    if scale is None:
        return
    scale = real(fn, "scale", scale)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if abs(scale) > torch.finfo(acc).max:
        fail(fn, "scale", f"finite in {acc} (the accumulation type of {dtype})", scale)
