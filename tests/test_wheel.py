"""The built wheel, installed into a fresh virtual environment, imports and passes the op tests.

Slow (builds the extension and installs torch into a new venv): run with `pytest -m slow`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

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


def run(cmd: list[str], cwd: Path) -> str:
    """Runs a command, failing the test with its output if it fails."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


@pytest.mark.slow
def test_wheel_in_fresh_venv(tmp_path: Path) -> None:
    """build_wheels.sh's wheel installs with torch==2.13.0 alone and passes the op tests there."""
    wheels = tmp_path / "wheelhouse"
    run(["bash", str(ROOT / "scripts" / "build_wheels.sh"), str(wheels)], ROOT)
    (wheel,) = wheels.glob("fedng-*manylinux_2_34*.whl")

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = str(env_dir / "bin" / "python")
    pip = [py, "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt")]
    run([*pip, str(wheel), "pytest", "hypothesis", "pytest-benchmark"], tmp_path)

    # Tests run from a copy outside the source tree, so only the installed wheel is importable.
    suite = tmp_path / "suite"
    suite.mkdir()
    for name in OP_TESTS + SUPPORT:
        shutil.copy(ROOT / "tests" / name, suite / name)
    config = run([py, "-c", "import fedng; fedng.show_config(); print(fedng.__file__)"], suite)
    print(config)
    assert str(env_dir) in config.splitlines()[-1], "fedng was not imported from the venv"
    assert "CUDA kernels built: no" in config
    out = run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(suite)], suite)
    print(out.splitlines()[-1])
    assert " passed" in out and "failed" not in out


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-m", "slow", "-s"]))
