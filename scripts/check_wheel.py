"""Checks a built fedng wheel: contents, ELF dependencies and symbol versions against its tag.

Usage: python scripts/check_wheel.py wheelhouse/fedng-*.whl

For the one extension `fedng/_C*.so` it reads, in pure Python (no binutils needed):
- DT_NEEDED: only libraries every manylinux system has (libc, libm, ...); never torch, c10,
  CUDA or OpenBLAS (OpenBLAS comes from the scipy-openblas32 package, preloaded at import);
- the required symbol versions (.gnu.version_r): the highest GLIBC, GLIBCXX, CXXABI and GCC
  versions must not exceed what the wheel's manylinux tag promises (auditwheel's policy);
- the exported symbols: `PyInit__C` only (a statically linked C++ runtime stays private).
Exits 1 on any problem, so a wheel tagged manylinux_2_28 with a glibc 2.34 symbol fails the build.
"""

from __future__ import annotations

import argparse
import re
import struct
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

ALLOWED_TOP = ("fedng/", "fedng-")  # the package and its .dist-info
FORBIDDEN_PARTS = ("tests/", "bench/", "csrc/", "build/", "__pycache__", ".cpp", ".h")
# The stub types the extension for users' type checkers; tests/test_native_boundary.py checks it.
REQUIRED = ("fedng/__init__.py", "fedng/py.typed", "fedng/ops/__init__.py", "fedng/_C.pyi")
# auditwheel's manylinux whitelist (the part a CPU extension could use) plus the dynamic loader.
ALLOWED_LIBS = re.compile(
    r"(libc|libm|libdl|librt|libpthread|libgcc_s|libstdc\+\+|libatomic|libutil|libmvec)\.so\.\d+"
    r"|ld-linux[-\w.]*\.so\.\d+"
)
EXPORTS = {"PyInit__C"}

Version = tuple[int, ...]
# Highest symbol versions each manylinux policy allows, by (glibc minor, arch): GLIBC GLIBCXX CXXABI
# GCC, from auditwheel 6.8's policy/manylinux-policy.json (numeric versions only). Legacy aliases
# map to their glibc level.
POLICY: dict[tuple[int, str], dict[str, Version]] = {}
for _line in """
    17 x86_64  2.17 3.4.19 1.3.7  4.8  | 17 aarch64 2.18 3.4.19 1.3.7  4.7
    24 x86_64  2.24 3.4.22 1.3.10 4.8  | 24 aarch64 2.24 3.4.22 1.3.10 4.7
    26 x86_64  2.26 3.4.22 1.3.10 4.8  | 26 aarch64 2.26 3.4.24 1.3.11 7.0
    27 x86_64  2.27 3.4.24 1.3.11 7.0  | 27 aarch64 2.27 3.4.24 1.3.11 7.0
    28 x86_64  2.28 3.4.24 1.3.11 7.0  | 28 aarch64 2.28 3.4.24 1.3.11 7.0
    31 x86_64  2.31 3.4.28 1.3.12 7.0  | 31 aarch64 2.31 3.4.28 1.3.12 7.0
    34 x86_64  2.34 3.4.29 1.3.13 7.0  | 34 aarch64 2.34 3.4.29 1.3.13 11.0
""".replace("|", "\n").split("\n"):
    if _line.strip():
        _minor, _arch, *_versions = _line.split()
        POLICY[(int(_minor), _arch)] = {
            prefix: tuple(int(x) for x in v.split("."))
            for prefix, v in zip(("GLIBC", "GLIBCXX", "CXXABI", "GCC"), _versions, strict=True)
        }
LEGACY = {"manylinux2014": 17}
CHECKED = ("GLIBC", "GLIBCXX", "CXXABI", "GCC")


# ---------------------------------------------------------------- ELF (64-bit little-endian) ---


@dataclass
class Elf:
    """The dynamic-linking facts of one shared object."""

    needed: list[str]
    version_needs: dict[str, set[str]]  # library -> version names required from it
    exports: list[str]  # defined global/weak dynamic symbols


def _cstr(data: bytes, off: int) -> str:
    return data[off : data.index(b"\0", off)].decode()


def read_elf(path: Path) -> Elf:
    """Parses DT_NEEDED, DT_VERNEED (.gnu.version_r) and the defined dynamic symbols."""
    data = path.read_bytes()
    if not (data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1):
        raise ValueError(f"{path}: expected a 64-bit little-endian ELF file")
    (e_phoff,) = struct.unpack_from("<Q", data, 0x20)
    (e_shoff,) = struct.unpack_from("<Q", data, 0x28)
    e_phentsize, e_phnum, e_shentsize, e_shnum = struct.unpack_from("<HHHH", data, 0x36)
    loads, dynamic = [], None
    for i in range(e_phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, e_phoff + i * e_phentsize
        )
        if p_type == 1:  # PT_LOAD
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == 2:  # PT_DYNAMIC
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        raise ValueError(f"{path}: no PT_DYNAMIC segment")

    def at(vaddr: int) -> int:
        for seg_vaddr, seg_off, seg_size in loads:
            if seg_vaddr <= vaddr < seg_vaddr + seg_size:
                return vaddr - seg_vaddr + seg_off
        raise ValueError(f"{path}: address {vaddr:#x} is in no PT_LOAD segment")

    tags: list[tuple[int, int]] = []
    for off in range(dynamic[0], dynamic[0] + dynamic[1], 16):
        tag, val = struct.unpack_from("<qQ", data, off)
        if tag == 0:
            break
        tags.append((tag, val))
    first = {}
    for tag, val in tags:
        first.setdefault(tag, val)
    strtab = at(first[5])  # DT_STRTAB
    needed = [_cstr(data, strtab + val) for tag, val in tags if tag == 1]  # DT_NEEDED

    version_needs: dict[str, set[str]] = {}
    if 0x6FFFFFFE in first:  # DT_VERNEED, DT_VERNEEDNUM: Elf64_Verneed / Elf64_Vernaux chains
        off = at(first[0x6FFFFFFE])
        for _ in range(first.get(0x6FFFFFFF, 0)):
            _, vn_cnt, vn_file, vn_aux, vn_next = struct.unpack_from("<HHIII", data, off)
            names = version_needs.setdefault(_cstr(data, strtab + vn_file), set())
            aux = off + vn_aux
            for _ in range(vn_cnt):
                _, _, _, vna_name, vna_next = struct.unpack_from("<IHHII", data, aux)
                names.add(_cstr(data, strtab + vna_name))
                aux += vna_next
            off += vn_next

    exports: list[str] = []
    for i in range(e_shnum):  # .dynsym (SHT_DYNSYM) and its string table (sh_link)
        sh = e_shoff + i * e_shentsize
        _, sh_type = struct.unpack_from("<II", data, sh)
        if sh_type != 11:
            continue
        sh_offset, sh_size, sh_link, _, _, sh_entsize = struct.unpack_from("<QQIIQQ", data, sh + 24)
        (str_off,) = struct.unpack_from("<Q", data, e_shoff + sh_link * e_shentsize + 24)
        for sym in range(sh_offset + sh_entsize, sh_offset + sh_size, sh_entsize):
            st_name, st_info, _, st_shndx = struct.unpack_from("<IBBH", data, sym)
            if st_shndx != 0 and st_info >> 4 in (1, 2):  # defined, STB_GLOBAL or STB_WEAK
                exports.append(_cstr(data, str_off + st_name))
    return Elf(needed, version_needs, exports)


def highest_versions(elf: Elf) -> dict[str, Version]:
    """Highest numeric version required per prefix, e.g. {"GLIBC": (2, 18), "GLIBCXX": ...}."""
    top: dict[str, Version] = {}
    for names in elf.version_needs.values():
        for name in names:
            m = re.fullmatch(r"([A-Z]+)_(\d+(?:\.\d+)*)", name)
            if m:
                v = tuple(int(x) for x in m[2].split("."))
                top[m[1]] = max(top.get(m[1], v), v)
    return top


def fmt(v: Version | None) -> str:
    return ".".join(map(str, v)) if v else "none"


# ---------------------------------------------------------------------------------- checks ---


def wheel_policy(wheel: Path) -> tuple[str, dict[str, Version]] | None:
    """The strictest manylinux policy among the wheel's platform tags (None if it has none)."""
    plats = wheel.stem.split("-")[-1].split(".")
    levels = []
    for plat in plats:
        m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", plat)
        legacy = re.fullmatch(r"(manylinux\d+)_(\w+)", plat)
        if m:
            levels.append((int(m[1]), m[2], plat))
        elif legacy and legacy[1] in LEGACY:
            levels.append((LEGACY[legacy[1]], legacy[2], plat))
    if not levels:
        return None
    minor, arch, plat = min(levels)
    if (minor, arch) not in POLICY:
        raise ValueError(f"{wheel.name}: no symbol-version limits known for {plat}")
    return plat, POLICY[(minor, arch)]


def check_extension(
    name: str, path: Path, policy: tuple[str, dict[str, Version]] | None
) -> list[str]:
    """Problems of one extension module: its libraries, symbol versions and exports."""
    problems = []
    elf = read_elf(path)
    top = highest_versions(elf)
    print(f"{name}: NEEDED {elf.needed}")
    print(f"{name}: highest " + ", ".join(f"{p} {fmt(top.get(p))}" for p in CHECKED))
    for lib in elf.needed:
        if not ALLOWED_LIBS.fullmatch(lib):
            problems.append(f"{name} links {lib} (not a manylinux system library)")
    for lib, versions in elf.version_needs.items():
        private = sorted(v for v in versions if v.endswith("_PRIVATE"))
        if private:
            problems.append(f"{name} needs private symbol versions {private} of {lib}")
    if policy is not None:
        plat, limits = policy
        for prefix in CHECKED:
            if prefix in top and top[prefix] > limits[prefix]:
                problems.append(
                    f"{name} needs {prefix}_{fmt(top[prefix])} but {plat} allows at most"
                    f" {prefix}_{fmt(limits[prefix])}"
                )
    extra = sorted(set(elf.exports) - EXPORTS)
    if extra:
        problems.append(f"{name} exports {len(extra)} symbols besides PyInit__C: {extra[:5]}")
    return problems


def check(wheel: Path) -> list[str]:
    """Returns the problems found in `wheel` (empty when it is good)."""
    problems = []
    policy = wheel_policy(wheel)
    if policy is None and "linux" in wheel.name:
        problems.append(f"{wheel.name} has no manylinux tag (run auditwheel repair)")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        for name in names:
            if not name.startswith(ALLOWED_TOP):
                problems.append(f"unexpected top-level entry: {name}")
            if any(part in name for part in FORBIDDEN_PARTS):
                problems.append(f"build/test file in the wheel: {name}")
        exts = [n for n in names if n.startswith("fedng/_C") and n.endswith(".so")]
        if len(exts) != 1:
            problems.append(f"expected one fedng/_C*.so, found {exts}")
        libs = [n for n in names if ".libs/" in n]
        if libs:
            problems.append(f"vendored libraries (auditwheel grafted them): {libs}")
        for required in REQUIRED:
            if required not in names:
                problems.append(f"missing {required}")
        with tempfile.TemporaryDirectory() as tmp:
            for ext in exts:
                problems += check_extension(ext, Path(zf.extract(ext, tmp)), policy)
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheels", nargs="+", type=Path)
    args = parser.parse_args()
    failed = False
    for wheel in args.wheels:
        problems = check(wheel)
        size = wheel.stat().st_size / 2**20
        print(f"{wheel.name}: {size:.2f} MiB, {'OK' if not problems else 'PROBLEMS'}")
        for p in problems:
            print(f"  - {p}")
        failed |= bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
