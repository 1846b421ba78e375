"""The setup scripts and the README's commands: a missing tool must fail a setup or CI run, not
skip; the GoogleTest build needs no make; the README runs as written with only python3."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SYSTEM_DEPS = ROOT / "scripts" / "system-deps.sh"
INSTALLED = "Status: install ok installed"


def stub_dir(tmp_path, **stubs):
    """A PATH directory holding only grep and the given shell-script stubs (``apt_get`` names
    apt-get), so the scripts see exactly the tools a test wants them to."""
    path = tmp_path / "bin"
    path.mkdir()
    (path / "grep").symlink_to(shutil.which("grep"))
    for name, body in stubs.items():
        stub = path / name.replace("_", "-")
        stub.write_text(f"#!/bin/sh\n{body}\n")
        stub.chmod(0o755)
    return path


def run_system_deps(path, python="/nonexistent/python3"):
    env = {"PATH": str(path), "PYTHON": python}
    return subprocess.run(
        ["/bin/bash", str(SYSTEM_DEPS)], env=env, capture_output=True, text=True, timeout=60
    )


NOT_INSTALLED = "exit 1"
ROOT_ID = 'if [ "$1" = -u ]; then echo 0; else exit 1; fi'
USER_ID = 'if [ "$1" = -u ]; then echo 1000; else exit 1; fi'


def test_system_deps_fails_when_it_cannot_install(tmp_path):
    result = run_system_deps(stub_dir(tmp_path, dpkg=NOT_INSTALLED, id=ROOT_ID))
    assert result.returncode != 0
    assert "missing system packages: g++ cmake ninja-build libgtest-dev" in result.stderr
    assert "no apt-get" in result.stderr


def test_system_deps_fails_without_root_or_sudo(tmp_path):
    path = stub_dir(tmp_path, dpkg=NOT_INSTALLED, apt_get="exit 0", id=USER_ID)
    result = run_system_deps(path)
    assert result.returncode != 0 and "not root and no sudo" in result.stderr


def test_system_deps_fails_when_apt_get_fails(tmp_path):
    path = stub_dir(tmp_path, dpkg=NOT_INSTALLED, apt_get="exit 100", id=ROOT_ID)
    result = run_system_deps(path)
    assert result.returncode != 0 and "apt-get update failed" in result.stderr


def test_system_deps_installs_only_what_is_missing(tmp_path):
    log = tmp_path / "apt.log"
    dpkg = f'[ "$2" = jargon-text ] && exit 1; echo "{INSTALLED}"'
    path = stub_dir(tmp_path, dpkg=dpkg, apt_get=f'echo "$@" >> {log}', id=ROOT_ID)
    result = run_system_deps(path)
    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines()[-1].endswith("--no-install-recommends jargon-text")


def test_system_deps_adds_headers_and_pip_for_debian_python(tmp_path):
    """A fresh Debian's python3 has neither its headers (python3-dev) nor pip (python3-pip)."""
    log = tmp_path / "apt.log"
    python = tmp_path / "python3"
    python.write_text('#!/bin/sh\n[ "$1" = -c ] && echo /usr && exit 0\nexit 1\n')
    python.chmod(0o755)
    path = stub_dir(tmp_path, dpkg=f'echo "{INSTALLED}"', apt_get=f'echo "$@" >> {log}', id=ROOT_ID)
    assert run_system_deps(path, str(python)).returncode == 0
    assert not log.exists()  # everything installed: nothing to do
    (path / "dpkg").write_text(
        f'#!/bin/sh\ncase "$2" in python3-*) exit 1;; esac\necho "{INSTALLED}"\n'
    )
    result = run_system_deps(path, str(python))
    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines()[-1].endswith("python3-dev python3-pip")


def run_cpp_core_test(path_dirs, ci):
    env = {**os.environ, "PATH": os.pathsep.join(map(str, path_dirs))}
    env.pop("CI", None)
    if ci:
        env["CI"] = "true"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "-rf"]
        + ["tests/test_cpp_core.py::test_ctest"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )


def test_cpp_core_fails_under_ci_when_cmake_is_missing(tmp_path):
    empty = stub_dir(tmp_path)
    result = run_cpp_core_test([empty], ci=True)
    assert result.returncode == 1, result.stdout
    assert "CI: cmake not on PATH" in result.stdout
    result = run_cpp_core_test([empty], ci=False)
    assert result.returncode == 0 and "1 skipped" in result.stdout, result.stdout


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cpp_core_builds_without_make(tmp_path):
    """setup installs Ninja, not make: the GoogleTest build must not call make."""
    from test_cpp_core import configure_and_build

    absent = "echo 'not installed' >&2; exit 127"
    no_make = stub_dir(tmp_path, make=absent, gmake=absent)  # CMake looks for gmake first
    env = {**os.environ, "PATH": os.pathsep.join([str(no_make), os.environ["PATH"]])}
    results = configure_and_build(env)
    assert all(r.returncode == 0 for r in results), "".join(r.stdout + r.stderr for r in results)


def test_readme_commands_use_python3():
    """A fresh Debian has python3 and no `python` (without python-is-python3)."""
    readme = (ROOT / "README.md").read_text()
    bare = re.findall(r"(?:^|[`(&;]\s*)python (?:-m |\S+\.py)", readme, flags=re.M)
    assert not bare, f"README runs `python`: {bare}"
    first = re.search(r"```bash\n(.*?)```", readme, flags=re.S).group(1)
    commands = [line for line in first.splitlines() if line and not line.startswith("#")]
    assert commands == [
        "bash scripts/setup.sh && python3 -m sinkdlm demo",
        "bash scripts/setup.sh && bash scripts/test.sh",
    ]


def test_readme_demo_command_starts():
    result = subprocess.run(
        [sys.executable, "-m", "sinkdlm", "demo", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "usage: sinkdlm demo" in result.stdout, result.stderr
