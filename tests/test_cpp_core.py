"""Builds the GoogleTest suite of the torch-free C++ core (tests/cpp) and runs it with ctest,
so the one test command, `pytest`, covers both halves."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "cpp-tests"


def run(cmd):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


@pytest.fixture(scope="module")
def gtest_build():
    if shutil.which("cmake") is None or shutil.which("ctest") is None:
        pytest.skip("cmake/ctest not on PATH: cannot build the GoogleTest suite")
    cfg = run(
        [
            "cmake",
            "-S",
            ".",
            "-B",
            str(BUILD),
            "-DSINKDLM_BUILD_EXTENSION=OFF",
            "-DSINKDLM_BUILD_TESTS=ON",
            "-DSINKDLM_WITH_CUDA=OFF",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
    )
    if cfg.returncode != 0 and "GTest" in cfg.stdout + cfg.stderr:
        pytest.skip("GoogleTest not found: `apt-get install libgtest-dev` (CI installs it)")
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    build = run(["cmake", "--build", str(BUILD), "--parallel"])
    assert build.returncode == 0, build.stdout + build.stderr
    return BUILD


def test_ctest(gtest_build):
    result = run(["ctest", "--test-dir", str(gtest_build), "--output-on-failure"])
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "100% tests passed" in result.stdout
