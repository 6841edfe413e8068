"""The manylinux wheel: scripts/check_wheel.py's ELF reader, and (slow) the built wheel, installed
into a fresh virtual environment with torch 2.13.0 alone, importing and passing the op tests.

The slow test builds the sdist and, from it, the manylinux_2_28 wheel with scripts/build_wheels.sh
(a zig toolchain from PyPI; a few minutes) and installs torch into a new venv: `pytest -m slow`.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import time
import venv
from pathlib import Path
from typing import Any

import pytest
from fedng import _C

ROOT = Path(__file__).resolve().parents[1]
OP_TESTS = [
    "test_kron_accumulate.py",
    "test_damped_cholesky_inverse.py",
    "test_kron_precondition.py",
    "test_sketch_accumulate.py",
    "test_nystrom.py",
    "test_lowrank_precondition.py",
    "test_gaussian_sketch_matrix.py",
    "test_validation.py",
    "test_native_boundary.py",
]
SUPPORT = ["conftest.py", "_tols.py", "elf_deps.py"]
TORCH = "torch==2.13.0"


def _check_wheel_module() -> Any:
    """scripts/check_wheel.py, imported as a module."""
    if "check_wheel" not in sys.modules:
        path = ROOT / "scripts" / "check_wheel.py"
        spec = importlib.util.spec_from_file_location("check_wheel", path)
        assert spec is not None and spec.loader is not None
        sys.modules["check_wheel"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["check_wheel"])
    return sys.modules["check_wheel"]


def test_elf_reader_on_the_built_extension() -> None:
    """The pure-Python reader finds libc, GLIBC symbol versions and PyInit__C as the one export."""
    cw = _check_wheel_module()
    elf = cw.read_elf(Path(_C.__file__))
    assert any(n.startswith("libc.so") for n in elf.needed), elf.needed
    assert not any("openblas" in n for n in elf.needed), "OpenBLAS is preloaded, not linked"
    assert "GLIBC" in cw.highest_versions(elf)
    assert elf.exports == ["PyInit__C"]


def test_symbol_versions_above_the_tag_fail() -> None:
    """A required GLIBC version above what the tag allows is a problem (the build then fails)."""
    cw = _check_wheel_module()
    path = Path(_C.__file__)
    strict = {"GLIBC": (2, 0), "GLIBCXX": (3, 4), "CXXABI": (1, 3), "GCC": (3, 0)}
    problems = cw.check_extension("_C", path, ("manylinux_2_0_test", strict))
    assert any("GLIBC_" in p and "allows at most GLIBC_2.0" in p for p in problems), problems
    top = cw.highest_versions(cw.read_elf(path))
    lenient = {k: (99,) for k in ("GLIBC", "GLIBCXX", "CXXABI", "GCC")}
    assert cw.check_extension("_C", path, ("manylinux_2_99_test", lenient)) == [], top


def test_wheel_policy_from_the_file_name() -> None:
    """The strictest manylinux tag of a multi-tagged wheel name sets the limits."""
    cw = _check_wheel_module()
    name = "fedng-0.1.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl"
    plat, limits = cw.wheel_policy(Path(name))
    assert plat == "manylinux_2_24_x86_64" and limits["GLIBC"] == (2, 24)
    assert cw.wheel_policy(Path("fedng-0.1.0-cp311-cp311-linux_x86_64.whl")) is None


def run(cmd: list[str], cwd: Path) -> str:
    """Runs a command, failing the test with its output if it fails."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


@pytest.mark.slow
def test_wheel_in_fresh_venv(tmp_path: Path) -> None:
    """build_wheels.sh's manylinux_2_28 wheel installs with torch 2.13.0 alone and passes the op
    tests there, importing OpenBLAS from the scipy-openblas32 dependency."""
    wheels = tmp_path / "wheelhouse"
    log = run(["bash", str(ROOT / "scripts" / "build_wheels.sh"), str(wheels)], ROOT)
    (wheel,) = wheels.glob("fedng-*.whl")
    assert "manylinux_2_28_x86_64" in wheel.name or "manylinux_2_28_aarch64" in wheel.name
    # auditwheel show's verdict: the most compatible policy the symbols allow, 2_28 or older.
    verdict = re.search(r'consistent with the following platform tag:\s*"manylinux_2_(\d+)_', log)
    assert verdict and int(verdict[1]) <= 28, log[-3000:]
    assert f"{wheel.name}: " in log and log.rstrip().endswith("OK"), log[-2000:]
    print(log[log.index("fedng/_C") :])

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = str(env_dir / "bin" / "python")
    pip = [py, "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt")]
    run([*pip, str(wheel), TORCH, "pytest", "hypothesis", "pytest-benchmark"], tmp_path)

    # Tests run from a copy outside the source tree, so only the installed wheel is importable.
    suite = tmp_path / "suite"
    suite.mkdir()
    for name in OP_TESTS + SUPPORT:
        shutil.copy(ROOT / "tests" / name, suite / name)
    config = run([py, "-c", "import fedng; fedng.show_config(); print(fedng.__file__)"], suite)
    print(config)
    assert str(env_dir) in config.splitlines()[-1], "fedng was not imported from the venv"
    assert "CUDA kernels built: no" in config and "torch 2.13.0" in config
    # The wheel's toolchain must pick the same small-matrix kernels (AVX2+FMA here) as this build.
    assert f"small-matrix kernels: {_C.small_kernel_isa()}" in config
    start = time.perf_counter()
    out = run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(suite)], suite)
    print(out.splitlines()[-1], f"({time.perf_counter() - start:.1f} s)")
    assert " passed" in out and "failed" not in out


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-m", "slow", "-s"]))
