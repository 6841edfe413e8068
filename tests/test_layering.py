"""The layering rules of DESIGN §1: csrc/ knows nothing of torch, _C links no libtorch, and the
seven op names of DESIGN §2 are the same in `fedng._C`, `fedng.ops` and `fedng.reference`."""

from __future__ import annotations

import re
from pathlib import Path

import fedng
from elf_deps import elf_needed
from fedng import _C, ops, reference

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"

# DESIGN §2, in table order.
OP_NAMES = (
    "kron_accumulate",
    "damped_cholesky_inverse",
    "kron_precondition",
    "sketch_accumulate",
    "nystrom",
    "lowrank_precondition",
    "gaussian_sketch_matrix",
)

INCLUDE = re.compile(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', re.MULTILINE)
FORBIDDEN_HEADER = re.compile(r"^(torch|ATen|c10|caffe2)/|^(torch|ATen)\.h$", re.IGNORECASE)
FORBIDDEN_LIB = re.compile(r"torch|c10", re.IGNORECASE)


def native_sources() -> list[Path]:
    """Every C/C++/CUDA source and header under csrc/."""
    exts = {".c", ".cc", ".cpp", ".cxx", ".h", ".hh", ".hpp", ".cu", ".cuh", ".inl"}
    return sorted(p for p in CSRC.rglob("*") if p.suffix in exts)


def test_csrc_includes_no_torch_header() -> None:
    """No file under csrc/ includes a torch, ATen, c10 or caffe2 header."""
    sources = native_sources()
    assert len(sources) >= 8, f"expected the C++ sources under {CSRC}, found {sources}"
    offenders = [
        f"{p.relative_to(ROOT)}: #include {h}"
        for p in sources
        for h in INCLUDE.findall(p.read_text(errors="replace"))
        if FORBIDDEN_HEADER.search(h)
    ]
    assert not offenders, "csrc/ must not include torch headers:\n" + "\n".join(offenders)


def test_forbidden_header_pattern_catches_torch() -> None:
    """The include scan recognises the headers it must reject (and accepts the allowed ones)."""
    text = '#include <torch/extension.h>\n  # include "ATen/ATen.h"\n#include <c10/util/Half.h>\n'
    text += "#include <pybind11/pybind11.h>\n#include <vector>\n"
    found = [h for h in INCLUDE.findall(text) if FORBIDDEN_HEADER.search(h)]
    assert found == ["torch/extension.h", "ATen/ATen.h", "c10/util/Half.h"]


def test_extension_links_no_libtorch() -> None:
    """fedng._C's ELF dependencies (DT_NEEDED) name no libtorch/libc10: BLAS and the runtime."""
    path = Path(_C.__file__)
    needed = elf_needed(path)
    assert any("openblas" in n for n in needed), f"parser sanity: OpenBLAS not in {needed}"
    assert any(n.startswith("libc.so") for n in needed), f"parser sanity: libc not in {needed}"
    bad = [n for n in needed if FORBIDDEN_LIB.search(n)]
    assert not bad, f"{path.name} links {bad}"


def test_extension_has_no_torch_symbols() -> None:
    """No torch/c10/ATen mangled names or library names are referenced anywhere in _C's image."""
    data = Path(_C.__file__).read_bytes()
    for marker in (b"libtorch", b"libc10", b"_ZN3c10", b"_ZN2at", b"_ZN5torch"):
        assert marker not in data, f"{marker!r} found in {_C.__file__}"


def test_every_op_is_bound_in_C() -> None:
    """fedng._C exposes every op of DESIGN §2 as a callable."""
    missing = [n for n in OP_NAMES if not callable(getattr(_C, n, None))]
    assert not missing, f"fedng._C lacks {missing}"


def test_ops_exports_the_same_names() -> None:
    """fedng.ops exports exactly the DESIGN §2 op functions (plus result types), same names."""
    exported = set(ops.__all__)
    functions = {n for n in exported if callable(getattr(ops, n)) and n[0].islower()}
    assert functions == set(OP_NAMES)
    c_ops = {n for n in dir(_C) if n in OP_NAMES}
    assert c_ops == set(OP_NAMES)
    for name in OP_NAMES:
        assert getattr(ops, name).__module__ == f"fedng.ops.{name}"


def test_reference_and_test_file_per_op() -> None:
    """One name everywhere: reference.<op>_ref and tests/test_<op>.py exist for every op."""
    for name in OP_NAMES:
        assert callable(getattr(reference, f"{name}_ref", None)), f"reference lacks {name}_ref"
        assert (ROOT / "tests" / f"test_{name}.py").is_file(), f"tests/test_{name}.py missing"


def test_version_comes_from_the_extension() -> None:
    """The Python package and the loaded extension are the same build (one version string)."""
    assert isinstance(_C.__version__, str) and _C.__version__
    assert fedng.__version__ == _C.__version__
