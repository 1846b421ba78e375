"""scripts/device-check.sh where this suite runs without a GPU: it parses, refuses an unknown
part by name before doing anything, and on a CPU build of torch stops at its preflight with the
reason recorded in DIR/steps.tsv (the GPU steps themselves run only on a device machine)."""

import subprocess
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "device-check.sh"


def run(out_dir, **env):
    import os

    return subprocess.run(
        ["bash", str(SCRIPT), str(out_dir)],
        env=dict(os.environ, **env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_an_unknown_part_is_refused_by_name(tmp_path):
    done = run(tmp_path, SINKDLM_DEVICE_CHECK_PARTS="tests benches")
    assert done.returncode == 2
    assert "unknown part 'benches'" in done.stderr
    assert not (tmp_path / "steps.tsv").exists()  # refused before any step


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="a GPU is present: the script would run its GPU steps"
)
def test_without_a_gpu_it_stops_at_the_preflight_and_says_why(tmp_path):
    done = run(tmp_path)
    assert done.returncode == 1
    steps = (tmp_path / "steps.tsv").read_text().splitlines()
    assert len(steps) == 1 and steps[0].startswith("preflight\tfail\t"), steps
    assert "CPU build" in steps[0] or "no CUDA GPU" in steps[0], steps
    assert "scripts/cuda-build-check.sh" in done.stdout
