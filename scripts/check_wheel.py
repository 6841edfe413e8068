"""Checks a built fedng wheel: only the package and its extension inside, no torch linkage.

Usage: python scripts/check_wheel.py dist/fedng-*.whl
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from elf_deps import elf_needed

ALLOWED_TOP = ("fedng/", "fedng-")  # the package and its .dist-info
FORBIDDEN_PARTS = ("tests/", "bench/", "csrc/", "build/", "__pycache__", ".cpp", ".h")
FORBIDDEN_LIBS = ("torch", "c10", "cudart", "cublas")
# The stub types the extension for users' type checkers; tests/test_native_boundary.py checks it.
REQUIRED = ("fedng/__init__.py", "fedng/py.typed", "fedng/ops/__init__.py", "fedng/_C.pyi")


def check(wheel: Path) -> list[str]:
    """Returns the problems found in `wheel` (empty when it is good)."""
    problems = []
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
        for required in REQUIRED:
            if required not in names:
                problems.append(f"missing {required}")
        with tempfile.TemporaryDirectory() as tmp:
            for ext in exts:
                path = Path(zf.extract(ext, tmp))
                needed = elf_needed(path)
                print(f"{ext}: NEEDED {needed}")
                for lib in needed:
                    if any(bad in lib for bad in FORBIDDEN_LIBS):
                        problems.append(f"{ext} links {lib}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
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
