"""The layering rules of docs/architecture.md: csrc/ knows nothing of torch, _C links no libtorch,
the seven op names (its table "Where each op lives") are the same in `fedng._C`, `fedng.ops` and
`fedng.reference`, and the Python
modules import only downward, without cycles (read statically with `ast`, imports inside
functions included).

Layers of `python/fedng`, lowest first (a module imports its own layer or lower ones):
    {_typing, errors, _backend, reference, ops, _C} < curvature < optim < federated < flower < cli
Inside `fedng.federated` (see `FEDERATED_LAYERS`):
    {wire, losses} < messages < {config, tasks} < {aggregation, client, checkpoint}
    < algorithms < validate < {server_round, summable_check} < round < report < resume < simulator
No module imports the package root `fedng`, and only cli.py imports fedng modules inside
functions (for start-up speed): anywhere else a deferred import would hide a cycle.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fedng
from elf_deps import elf_needed
from fedng import _C, ops, reference

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
PACKAGE = ROOT / "python" / "fedng"

LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"_typing", "errors", "_backend", "reference", "ops", "_C"}),
    frozenset({"curvature"}),
    frozenset({"optim"}),
    frozenset({"federated"}),
    frozenset({"flower"}),
    frozenset({"cli", "__main__"}),
)
"""Top-level modules / subpackages of fedng, lowest layer first."""

FEDERATED_LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"wire", "losses"}),
    frozenset({"messages"}),
    frozenset({"config", "tasks"}),
    frozenset({"aggregation", "client", "checkpoint"}),
    frozenset({"algorithms"}),
    frozenset({"validate"}),
    frozenset({"server_round", "summable_check"}),
    frozenset({"round"}),
    frozenset({"report", "attacks"}),
    frozenset({"resume"}),
    frozenset({"simulator"}),
)
"""Modules / subpackages of fedng.federated, lowest sub-layer first; the package's own __init__
(the public re-exports) sits above them all."""

LAZY_IMPORTS_ALLOWED = frozenset({"fedng.cli"})
"""Modules that may import fedng inside functions (cli.py, for start-up speed)."""

# The ops, in the order of docs/architecture.md's table.
OP_NAMES = (
    "kron_accumulate",
    "damped_cholesky_inverse",
    "kron_precondition",
    "sketch_accumulate",
    "nystrom",
    "lowrank_precondition",
    "gaussian_sketch_matrix",
    "kfac_step",
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
    """fedng._C's ELF dependencies (DT_NEEDED) name no libtorch/libc10, and not OpenBLAS either:
    `fedng._backend` preloads scipy-openblas32's library (RTLD_GLOBAL) before importing `_C`."""
    path = Path(_C.__file__)
    needed = elf_needed(path)
    assert not any("openblas" in n for n in needed), f"OpenBLAS is preloaded, not linked: {needed}"
    assert any(n.startswith("libc.so") for n in needed), f"parser sanity: libc not in {needed}"
    bad = [n for n in needed if FORBIDDEN_LIB.search(n)]
    assert not bad, f"{path.name} links {bad}"


def test_extension_has_no_torch_symbols() -> None:
    """No torch/c10/ATen mangled names or library names are referenced anywhere in _C's image."""
    data = Path(_C.__file__).read_bytes()
    for marker in (b"libtorch", b"libc10", b"_ZN3c10", b"_ZN2at", b"_ZN5torch"):
        assert marker not in data, f"{marker!r} found in {_C.__file__}"


def test_every_op_is_bound_in_C() -> None:
    """fedng._C exposes every op as a callable."""
    missing = [n for n in OP_NAMES if not callable(getattr(_C, n, None))]
    assert not missing, f"fedng._C lacks {missing}"


def test_ops_exports_the_same_names() -> None:
    """fedng.ops exports exactly the op functions (plus result types), same names."""
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


# --- Python import layering --------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    """One import of a fedng module by another.

    Attributes:
        source: the importing module (dotted).
        target: the imported module (dotted; a package stands for its __init__).
        line: line number in the source.
        in_function: the import statement sits inside a function body.
    """

    source: str
    target: str
    line: int
    in_function: bool


def discover(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under `package` (a package is its __init__)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


ImportNode = ast.Import | ast.ImportFrom


def _statements(tree: ast.AST) -> Iterator[tuple[ImportNode, bool]]:
    """Every import statement of a module, with whether it sits inside a function."""

    def walk(node: ast.AST, in_function: bool) -> Iterator[tuple[ImportNode, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_function
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            yield from walk(child, inner)

    yield from walk(tree, False)


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module `name` refers to: itself, or its longest known prefix (a package attribute)."""
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name if name in modules else None


def imports_of(module: str, modules: dict[str, Path]) -> list[Import]:
    """The fedng modules `module` imports (at any depth of its syntax tree)."""
    path = modules[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node, in_function in _statements(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{a.name}" if base else a.name for a in node.names]
        for name in names:
            if name.split(".")[0] != "fedng" or name == "fedng._C" or name.startswith("fedng._C."):
                continue  # not fedng, or the native extension (layer 0, no source here)
            target = _resolve(name, modules)
            imp = Import(module, target or "", node.lineno, in_function)
            if target is not None and target != module and imp not in out:
                out.append(imp)
    return out


def rank(module: str) -> tuple[int, int] | None:
    """(layer, federated sub-layer) of a module; None for a module no layer lists.

    The package root `fedng` and `fedng.federated` itself rank above their contents.
    """
    parts = module.split(".")
    if len(parts) == 1:
        return (len(LAYERS), 0)
    top = next((i for i, names in enumerate(LAYERS) if parts[1] in names), None)
    if top is None:
        return None
    if parts[1] != "federated":
        return (top, 0)
    if len(parts) == 2:
        return (top, len(FEDERATED_LAYERS))
    sub = next((i for i, names in enumerate(FEDERATED_LAYERS) if parts[2] in names), None)
    return None if sub is None else (top, sub)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def layering_violations(package: Path) -> list[str]:
    """Every breach of the layering rules in the package at `package` (python/fedng)."""
    modules = discover(package)
    problems = [f"{m}: in no layer of LAYERS / FEDERATED_LAYERS" for m in modules if not rank(m)]
    edges: dict[str, set[str]] = {}
    for m in modules:
        for imp in imports_of(m, modules):
            edges.setdefault(m, set()).add(imp.target)
            where = f"{m}:{imp.line} imports {imp.target}"
            src, dst = rank(m), rank(imp.target)
            if imp.target == "fedng":
                if m not in LAZY_IMPORTS_ALLOWED:
                    problems.append(f"{where}: the package root")
            elif src is not None and dst is not None and dst > src:
                problems.append(f"{where}: an upward import")
            if imp.in_function and m not in LAZY_IMPORTS_ALLOWED:
                problems.append(f"{where} inside a function")
    problems += [f"import cycle: {' <-> '.join(c)}" for c in _cycles(edges)]
    return problems


def test_python_imports_are_layered() -> None:
    """No upward import, no cycle, no root import, no deferred import in python/fedng."""
    modules = discover(PACKAGE)
    assert "fedng.federated.round" in modules and "fedng.cli" in modules
    assert "fedng.federated.algorithms.registry" in {
        i.target for i in imports_of("fedng.federated.round", modules)
    }
    problems = layering_violations(PACKAGE)
    assert not problems, "layering violations:\n" + "\n".join(problems)


def test_layering_check_catches_planted_violations(tmp_path: Path) -> None:
    """The checker reports a planted cycle, upward imports, a deferred import and a root import,
    and accepts the allowed forms (so the real check cannot pass vacuously)."""
    files = {
        "__init__.py": "from fedng.optim import x\n",
        "ops/__init__.py": "import fedng.curvature.kfac\n",  # upward: ops -> curvature
        "curvature/__init__.py": "",
        "curvature/kfac.py": "from fedng import ops\nfrom fedng._C import y\n",
        "optim/__init__.py": "from . import sgd\n",
        "optim/sgd.py": "from ..curvature import kfac\n",
        "federated/__init__.py": "from fedng.federated.simulator import run\n",
        "federated/wire.py": "from fedng.federated.messages import M\n",  # upward sub-layer
        "federated/messages.py": "from fedng.federated import wire\n",  # + the line above: cycle
        "federated/simulator.py": "def run():\n    from fedng.federated import round\n",
        "federated/round.py": "import fedng\n",  # the package root
        "federated/extra.py": "",  # in no layer
        "cli.py": "def main():\n    import fedng\n    from fedng.federated import simulator\n",
    }
    for name, text in files.items():
        (tmp_path / "fedng" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fedng" / name).write_text(text)
    got = sorted(layering_violations(tmp_path / "fedng"))
    assert got == sorted(
        [
            "fedng.federated.extra: in no layer of LAYERS / FEDERATED_LAYERS",
            "fedng.ops:1 imports fedng.curvature.kfac: an upward import",
            "fedng.federated.wire:1 imports fedng.federated.messages: an upward import",
            "fedng.federated.simulator:2 imports fedng.federated.round inside a function",
            "fedng.federated.round:1 imports fedng: the package root",
            "import cycle: fedng.curvature.kfac <-> fedng.ops",
            "import cycle: fedng.federated.messages <-> fedng.federated.wire",
        ]
    ), got
