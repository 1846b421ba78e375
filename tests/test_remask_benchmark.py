"""benchmarks/remask.py's output check: all three outputs compared, a mismatch fails the run."""

from argparse import Namespace

import pytest
import torch
from conftest import load_script

import sinkdlm


def load_benchmark():
    return load_script("benchmarks/remask.py")


ARGS = Namespace(batch=2, length=16, num_transfer=5, repeats=1)


def test_matching_outputs_pass():
    bench = load_benchmark()
    row = bench.run("cpu", 300, ARGS, None)
    assert row["mismatch_eager"] == []
    bench.require_match([row])


@pytest.mark.parametrize("output", ["x_new", "transferred", "confidence"])
def test_each_output_is_compared_and_a_mismatch_fails(monkeypatch, output):
    """Issue 19: only x_new was compared, and a mismatch was printed but did not fail."""
    bench = load_benchmark()
    reference = sinkdlm.remask_step_reference

    def perturbed(*args, **kwargs):
        x_new, transferred, confidence = reference(*args, **kwargs)
        if output == "x_new":
            x_new = x_new + transferred.long()
        elif output == "transferred":
            transferred = ~transferred
        else:
            confidence = torch.where(transferred, confidence * 0.999, confidence)
        return x_new, transferred, confidence

    monkeypatch.setattr(sinkdlm, "remask_step_reference", perturbed)
    row = bench.run("cpu", 300, ARGS, None)
    assert row["mismatch_eager"] == [output]
    with pytest.raises(SystemExit, match=f"V=300 vs eager: {output}"):
        bench.require_match([row])
