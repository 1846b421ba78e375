"""Builds the GoogleTest suite of the torch-free C++ core (tests/cpp) and runs it with ctest,
so the one test command, `pytest`, covers both halves.

The build uses Ninja, which scripts/setup.sh installs (make is not among its packages). A
missing tool (cmake, ctest, ninja, GoogleTest) skips here only outside CI: under CI=true it
fails the run, since setup is meant to have installed it."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "gtest"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(what: str):
    message = f"{what}: scripts/setup.sh installs it (scripts/system-deps.sh)"
    if in_ci():
        pytest.fail(f"CI: {message}")
    pytest.skip(message)


def run(cmd, env=None):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)


def configure_and_build(env=None):
    """Configures BUILD with Ninja and builds it; returns each step's CompletedProcess, the
    last one failed if any did."""
    steps = [
        [
            "cmake",
            "-S",
            ".",
            "-B",
            str(BUILD),
            "-G",
            "Ninja",
            "-DSINKDLM_BUILD_EXTENSION=OFF",
            "-DSINKDLM_BUILD_TESTS=ON",
            "-DSINKDLM_WITH_CUDA=OFF",
            "-DCMAKE_BUILD_TYPE=Release",
        ],
        ["cmake", "--build", str(BUILD), "--parallel"],
    ]
    results = []
    for step in steps:
        results.append(run(step, env))
        if results[-1].returncode != 0:
            break
    return results


@pytest.fixture(scope="module")
def gtest_build():
    for tool in ("cmake", "ctest", "ninja"):
        if shutil.which(tool) is None:
            missing(f"{tool} not on PATH: cannot build the GoogleTest suite")
    results = configure_and_build()
    log = "".join(r.stdout + r.stderr for r in results)
    if results[0].returncode != 0 and "GTest" in log:
        missing("GoogleTest not found (Debian: libgtest-dev)")
    assert all(r.returncode == 0 for r in results), log
    return BUILD


def test_ctest(gtest_build):
    result = run(["ctest", "--test-dir", str(gtest_build), "--output-on-failure"])
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "100% tests passed" in result.stdout
