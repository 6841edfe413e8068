"""The typed native boundary: `fedng/_C.pyi` describes the built `fedng._C` exactly, every op takes
keyword arguments only in the one parameter order of csrc/include/fedng/ops.h, `fedng.ops` calls
it with keywords only, and the dtype and status codes agree on both sides."""

from __future__ import annotations

import ast
import re
import threading
import time
from pathlib import Path

import fedng
import pytest
import torch
from fedng import _C, ops
from fedng.ops import CholeskyStatus
from fedng.ops._validate import FLOAT_DTYPES

PACKAGE = Path(fedng.__file__).resolve().parent
STUB = PACKAGE / "_C.pyi"

# The op functions of fedng.ops (test_layering holds them to the docs' op table and to _C's names).
OP_NAMES = tuple(sorted(n for n in ops.__all__ if n[0].islower()))

# Per-matrix reports, in their one order; each op that has them writes `status` first.
REPORTS = {"damped_cholesky_inverse": ("damping", "status"), "nystrom": ("shift", "status")}

Param = tuple[str, str]  # (name, normalized type); "*" marks the start of keyword-only ones


def split_top_level(text: str) -> list[str]:
    """Splits `text` at the commas not nested in brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    if text[start:].strip():
        parts.append(text[start:].strip())
    return parts


def normalize(annotation: str) -> str:
    """Maps pybind11's spellings (2.x: int, list[int]; 3.x: SupportsInt | SupportsIndex,
    collections.abc.Sequence[...]) and the stub's onto one form: int, float, Sequence[int]."""
    a = re.sub(r"\b(typing|collections\.abc)\.", "", annotation.replace(" ", ""))
    for supports, plain in (("SupportsInt", "int"), ("SupportsFloat", "float")):
        a = a.replace(f"{supports}|SupportsIndex", plain).replace(supports, plain)
    return re.sub(r"\b(list|List)\[", "Sequence[", a)


def runtime_signature(name: str) -> tuple[list[Param], str]:
    """Parameters and return type of `_C.<name>`, parsed from pybind11's docstring signature."""
    doc = getattr(_C, name).__doc__ or ""
    first = doc.splitlines()[0] if doc else ""
    match = re.fullmatch(rf"{name}\((.*)\) -> (.+)", first)
    assert match, f"_C.{name} has no pybind11 signature line: {first!r}"
    params: list[Param] = []
    for part in split_top_level(match.group(1)):
        if part == "*":
            params.append(("*", ""))
            continue
        pname, _, ptype = part.partition(":")
        assert "=" not in ptype, f"_C.{name}: '{pname}' has a default; the stub gives none"
        params.append((pname.strip(), normalize(ptype)))
    return params, normalize(match.group(2))


def stub_tree() -> ast.Module:
    return ast.parse(STUB.read_text(), filename=str(STUB))


def stub_functions() -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in stub_tree().body if isinstance(n, ast.FunctionDef)}


def stub_attributes() -> dict[str, str]:
    return {
        n.target.id: ast.unparse(n.annotation)
        for n in stub_tree().body
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
    }


def stub_signature(fn: ast.FunctionDef) -> tuple[list[Param], str]:
    """The stub's parameters, written the way `runtime_signature` reads pybind11's."""
    args = fn.args
    assert not args.posonlyargs and args.vararg is None and args.kwarg is None
    assert not args.defaults and not any(args.kw_defaults), f"{fn.name}: defaults in the stub"

    def param(a: ast.arg) -> Param:
        assert a.annotation is not None, f"{fn.name}: '{a.arg}' has no annotation in the stub"
        return a.arg, normalize(ast.unparse(a.annotation))

    params = [param(a) for a in args.args]
    if args.kwonlyargs:
        params += [("*", ""), *(param(a) for a in args.kwonlyargs)]
    assert fn.returns is not None, f"{fn.name}: no return annotation in the stub"
    return params, normalize(ast.unparse(fn.returns))


def test_stub_ships_in_the_package() -> None:
    """The stub lies next to py.typed in the imported package (so in the wheel, run from it)."""
    assert STUB.is_file(), f"{STUB} missing"
    assert (PACKAGE / "py.typed").is_file()


def test_stub_and_module_have_the_same_names() -> None:
    """Every public function and attribute of `_C` is in the stub, and nothing else is."""
    runtime = {n for n in dir(_C) if not n.startswith("_")} | {"__version__"}
    declared = set(stub_functions()) | set(stub_attributes())
    assert declared == runtime, (
        f"only in _C: {sorted(runtime - declared)}; only in _C.pyi: {sorted(declared - runtime)}"
    )
    for name in stub_functions():
        assert callable(getattr(_C, name)), f"_C.{name} is declared a function but is not callable"


@pytest.mark.parametrize("name", sorted(stub_functions()))
def test_function_signatures_agree(name: str) -> None:
    """Same parameter names, order, keyword-only marker, types and return type as the module."""
    assert runtime_signature(name) == stub_signature(stub_functions()[name])


def is_str_int_dict(x: object) -> bool:
    return isinstance(x, dict) and all(isinstance(k, str) and type(v) is int for k, v in x.items())


def test_attribute_types_agree() -> None:
    """Each attribute has the type the stub declares."""
    checks = {
        "str": lambda x: isinstance(x, str),
        "bool": lambda x: isinstance(x, bool),
        "dict[str, int]": is_str_int_dict,
    }
    for name, annotation in stub_attributes().items():
        assert annotation in checks, f"add a runtime check for {name}: {annotation}"
        assert checks[annotation](getattr(_C, name)), f"_C.{name} is not a {annotation}"


@pytest.mark.parametrize("name", OP_NAMES)
def test_op_parameter_order(name: str) -> None:
    """One order for every op: dtype first, keyword-only; reports `status` then `<param>_used`
    right before `nthreads`, which is last."""
    params, returns = runtime_signature(name)
    names = [p for p, _ in params]
    assert names[:2] == ["*", "dtype"], f"{name}: {names}"
    assert names[-1] == "nthreads", f"{name}: {names}"
    assert returns == "None"
    reports = [p for p in names if p == "status" or p.endswith("_used")]
    if name in REPORTS:
        param, _ = REPORTS[name]
        assert names[-3:-1] == ["status", f"{param}_used"], f"{name}: {names}"
        assert param in names, f"{name}: '{param}_used' reports a parameter it does not take"
    else:
        assert not reports, f"{name}: unexpected reports {reports}"


def empty_call(name: str) -> dict[str, object]:
    """Keyword arguments for a valid call of op `name` on zero matrices (it does nothing)."""
    params, _ = stub_signature(stub_functions()[name])
    values: dict[str, object] = {"int": 0, "float": 2.0, "Sequence[int]": [], "Sequence[float]": []}
    kwargs = {p: values[t] for p, t in params if p != "*"}
    kwargs.update({k: 1 for k in ("nthreads", "max_tries") if k in kwargs})
    return kwargs


@pytest.mark.parametrize("name", OP_NAMES)
def test_ops_reject_positional_and_unknown_arguments(name: str) -> None:
    """A swapped or misnamed address cannot reach the kernel: positional arguments and keywords
    of another op (another op's report name) are TypeErrors, raised before anything runs."""
    fn = getattr(_C, name)
    kwargs = empty_call(name)
    fn(**kwargs)  # the baseline is a valid call: the failures below are the names alone
    with pytest.raises(TypeError):
        fn(*kwargs.values())
    wrong = "shift_used" if "damping_used" in kwargs else "damping_used"
    with pytest.raises(TypeError):
        fn(**kwargs, **{wrong: 0})


def test_out_parameters_by_name() -> None:
    """Reports land in the buffers named for them: int8 status, float64 damping_used."""
    mats = [2 * torch.eye(3, dtype=torch.float64), torch.full((2, 2), float("nan")).double()]
    outs = [torch.empty_like(m) for m in mats]
    status = torch.full((2,), -1, dtype=torch.int8)
    used = torch.zeros(2, dtype=torch.float64)
    _C.damped_cholesky_inverse(
        dtype=_C.dtype_codes["float64"],
        mats=[m.data_ptr() for m in mats],
        outs=[o.data_ptr() for o in outs],
        n=[3, 2],
        damping=[0.5, 0.5],
        max_tries=2,
        jitter_factor=10.0,
        status=status.data_ptr(),
        damping_used=used.data_ptr(),
        nthreads=1,
    )
    assert status.tolist() == [CholeskyStatus.OK, CholeskyStatus.FAILED]
    assert used[0].item() == 0.5 and used[1].isnan()
    torch.testing.assert_close(outs[0], torch.eye(3, dtype=torch.float64) / 2.5)


def test_ops_release_the_gil() -> None:
    """Python threads run while a kernel does: the main thread ticks during a ~0.1 s call."""
    out = torch.empty(3000, 3000, dtype=torch.float32)
    span: dict[str, float] = {}

    def work() -> None:
        span["start"] = time.perf_counter()
        _C.gaussian_sketch_matrix(
            dtype=_C.dtype_codes["float32"],
            out=out.data_ptr(),
            d=3000,
            r=3000,
            seed=0,
            stream_id=0,
            nthreads=1,
        )
        span["end"] = time.perf_counter()

    ticks = []
    worker = threading.Thread(target=work)
    before = _C.set_gaussian_isa("baseline")  # the slowest build: a call long enough to tell
    try:
        worker.start()
        while worker.is_alive():
            ticks.append(time.perf_counter())
            time.sleep(0.001)
        worker.join()
    finally:
        _C.set_gaussian_isa(before)
    start, end = span["start"] + 0.01, span["end"] - 0.01
    assert end - start > 0.02, "the call was too short to tell; make it larger"
    inside = [t for t in ticks if start < t < end]
    assert len(inside) >= 5, f"{len(inside)} ticks in {end - start:.3f} s: the GIL was held"


def test_codes_agree_with_python() -> None:
    """The dtype codes and status codes of the kernels are those of `fedng.ops`."""
    assert _C.dtype_codes == {str(dt).removeprefix("torch."): c for dt, c in FLOAT_DTYPES.items()}
    assert _C.status_codes == {s.name: int(s) for s in CholeskyStatus}


def native_calls() -> list[tuple[Path, ast.Call, str]]:
    """Every call `_backend.native.<op>(...)` in fedng/ops/*.py."""
    found = []
    for path in sorted(Path(ops.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and ast.unparse(node.func.value) in ("_backend.native", "native", "_C")
            ):
                found.append((path, node, node.func.attr))
    return found


def test_ops_call_the_extension_with_keywords_only() -> None:
    """fedng.ops passes every parameter of each op by name, and nothing positionally."""
    calls = native_calls()
    assert {op for _, _, op in calls} == set(OP_NAMES)
    stub = stub_functions()
    for path, call, op in calls:
        where = f"{path.name}:{call.lineno}"
        assert not call.args, f"{where}: positional arguments to _C.{op}"
        given = [k.arg for k in call.keywords]
        expected = [p for p, _ in stub_signature(stub[op])[0] if p != "*"]
        assert sorted(given, key=str) == sorted(expected), f"{where}: {given} != {expected}"


def test_ops_compare_status_through_the_enum() -> None:
    """No bare integer status codes in fedng.ops: comparisons with `status` use CholeskyStatus."""
    offenders = []
    for path in sorted(Path(ops.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Compare) and "status" in ast.unparse(node):
                sides = [node.left, *node.comparators]
                if any(isinstance(s, ast.Constant) and type(s.value) is int for s in sides):
                    offenders.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, "\n".join(offenders)
