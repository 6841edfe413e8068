"""The layering rules of DESIGN §1: csrc/ knows nothing of torch, _C links no libtorch, and the
seven op names of DESIGN §2 are the same in `fedng._C`, `fedng.ops` and `fedng.reference`."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import fedng
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
DT_NEEDED = 1


def native_sources() -> list[Path]:
    """Every C/C++/CUDA source and header under csrc/."""
    exts = {".c", ".cc", ".cpp", ".cxx", ".h", ".hh", ".hpp", ".cu", ".cuh", ".inl"}
    return sorted(p for p in CSRC.rglob("*") if p.suffix in exts)


def elf_needed(path: Path) -> list[str]:
    """DT_NEEDED entries of a 64-bit little-endian ELF shared object, parsed without binutils."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "expected ELF64 LSB"
    (e_phoff,) = struct.unpack_from("<Q", data, 0x20)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 0x36)
    loads: list[tuple[int, int, int]] = []  # (vaddr, offset, filesz) of PT_LOAD segments
    dynamic: tuple[int, int] | None = None
    for i in range(e_phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, e_phoff + i * e_phentsize
        )
        if p_type == 1:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == 2:
            dynamic = (p_offset, p_filesz)
    assert dynamic is not None, "no PT_DYNAMIC segment"
    entries: list[tuple[int, int]] = []
    off, end = dynamic[0], dynamic[0] + dynamic[1]
    while off < end:
        tag, val = struct.unpack_from("<qQ", data, off)
        if tag == 0:
            break
        entries.append((tag, val))
        off += 16
    strtab_vaddr = next(val for tag, val in entries if tag == 5)  # DT_STRTAB

    def file_offset(vaddr: int) -> int:
        for seg_vaddr, seg_off, seg_size in loads:
            if seg_vaddr <= vaddr < seg_vaddr + seg_size:
                return vaddr - seg_vaddr + seg_off
        raise AssertionError(f"address {vaddr:#x} is in no PT_LOAD segment")

    strtab = file_offset(strtab_vaddr)
    names = []
    for tag, val in entries:
        if tag == DT_NEEDED:
            start = strtab + val
            names.append(data[start : data.index(b"\0", start)].decode())
    return names


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
