"""Bad input across the ops: every error is raised before any pointer is taken, with a message that
names the op and the argument (and what was expected / got)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from fedng import ops
from fedng.errors import BackendUnavailable, FedngError, NumericalError

F32, F64 = torch.float32, torch.float64


def t(*shape: int, dtype: torch.dtype = F64) -> torch.Tensor:
    """A small contiguous CPU tensor of ones."""
    return torch.ones(*shape, dtype=dtype)


def meta(*shape: int) -> torch.Tensor:
    """A tensor on a non-CPU device (stands in for CUDA on this CPU-only machine)."""
    return torch.empty(*shape, device="meta")


def noncontig(n: int, m: int) -> torch.Tensor:
    """An [n, m] view with transposed strides."""
    x = torch.arange(n * m, dtype=F64).reshape(m, n).T
    assert not x.is_contiguous()
    return x


def gen_list() -> object:
    return (x for x in [t(2, 2)])


KA, DCI, KP = "kron_accumulate", "damped_cholesky_inverse", "kron_precondition"
SA, NY, LR = "sketch_accumulate", "nystrom", "lowrank_precondition"

# (call, exception, substrings the message must contain). The op name is always checked too.
Case = tuple[Callable[[], object], type[Exception], list[str]]

CASES: dict[str, Case] = {
    # --- kron_accumulate -------------------------------------------------------------------------
    "ka-factors-not-list": (
        lambda: ops.kron_accumulate(t(2, 2), [t(1, 2)]),
        TypeError,
        ["'factors'", "list of tensors", "Tensor"],
    ),
    "ka-inputs-generator": (
        lambda: ops.kron_accumulate([t(2, 2)], gen_list()),
        TypeError,
        ["'inputs'", "generator"],
    ),
    "ka-item-not-tensor": (
        lambda: ops.kron_accumulate([[[1.0]]], [t(1, 1)]),
        TypeError,
        ["'factors[0]'", "torch.Tensor", "list"],
    ),
    "ka-lengths": (
        lambda: ops.kron_accumulate([t(2, 2), t(2, 2)], [t(1, 2)]),
        ValueError,
        ["'inputs'", "2 tensors", "got 1"],
    ),
    "ka-int-dtype": (
        lambda: ops.kron_accumulate([t(2, 2, dtype=torch.int64)], [t(1, 2, dtype=torch.int64)]),
        TypeError,
        ["'factors[0]'", "float32 or float64", "torch.int64"],
    ),
    "ka-half-dtype": (
        lambda: ops.kron_accumulate([t(2, 2, dtype=torch.float16)], [t(1, 2, dtype=torch.float16)]),
        TypeError,
        ["'factors[0]'", "torch.float16"],
    ),
    "ka-mixed-dtypes": (
        lambda: ops.kron_accumulate([t(2, 2, dtype=F32)], [t(1, 2)]),
        TypeError,
        ["'factors[0]'", "'inputs[0]'", "torch.float32", "torch.float64"],
    ),
    "ka-mixed-within-list": (
        lambda: ops.kron_accumulate([t(2, 2), t(2, 2, dtype=F32)], [t(1, 2), t(1, 2)]),
        TypeError,
        ["'factors[1]'", "share one dtype"],
    ),
    "ka-shape": (
        lambda: ops.kron_accumulate([t(3, 3)], [t(2, 4)]),
        ValueError,
        ["'inputs[0]'", "[*, 3]", "[2, 4]"],
    ),
    "ka-factor-not-square": (
        lambda: ops.kron_accumulate([t(3, 4)], [t(2, 4)]),
        ValueError,
        ["'factors[0]'", "square", "[3, 4]"],
    ),
    "ka-input-1d": (
        lambda: ops.kron_accumulate([t(3, 3)], [t(3)]),
        ValueError,
        ["'inputs[0]'", "[*, 3]", "got [3]"],
    ),
    "ka-noncontig": (
        lambda: ops.kron_accumulate([t(3, 3)], [noncontig(2, 3)]),
        ValueError,
        ["'inputs[0]'", "contiguous", "strides"],
    ),
    "ka-noncontig-factor": (
        lambda: ops.kron_accumulate([noncontig(3, 3)], [t(1, 3)]),
        ValueError,
        ["'factors[0]'", "contiguous"],
    ),
    "ka-meta": (
        lambda: ops.kron_accumulate([meta(2, 2)], [meta(1, 2)]),
        BackendUnavailable,
        ["'factors[0]'", "meta", "CPU"],
    ),
    "ka-meta-input": (
        lambda: ops.kron_accumulate([t(2, 2, dtype=F32)], [meta(1, 2)]),
        BackendUnavailable,
        ["'inputs[0]'", "meta"],
    ),
    "ka-decay-nan": (
        lambda: ops.kron_accumulate([t(2, 2)], [t(1, 2)], decay=float("nan")),
        ValueError,
        ["'decay'", "finite", "nan"],
    ),
    "ka-decay-inf": (
        lambda: ops.kron_accumulate([t(2, 2)], [t(1, 2)], decay=float("inf")),
        ValueError,
        ["'decay'", "inf"],
    ),
    "ka-decay-str": (
        lambda: ops.kron_accumulate([t(2, 2)], [t(1, 2)], decay="1"),
        TypeError,
        ["'decay'", "str"],
    ),
    "ka-scale-inf": (
        lambda: ops.kron_accumulate([t(2, 2)], [t(1, 2)], scale=float("inf")),
        ValueError,
        ["'scale'", "inf"],
    ),
    "ka-scale-length": (
        lambda: ops.kron_accumulate([t(2, 2)], [t(1, 2)], scale=[1.0, 2.0]),
        ValueError,
        ["'scale'", "1 values", "got 2"],
    ),
    "ka-alias": (
        lambda: (lambda f: ops.kron_accumulate([f], [f]))(t(2, 2)),
        ValueError,
        ["'inputs[0]'", "'factors'", "memory"],
    ),
    # --- damped_cholesky_inverse -----------------------------------------------------------------
    "dci-not-list": (lambda: ops.damped_cholesky_inverse(t(2, 2), 0.1), TypeError, ["'mats'"]),
    "dci-int-dtype": (
        lambda: ops.damped_cholesky_inverse([t(2, 2, dtype=torch.int32)], 0.1),
        TypeError,
        ["'mats[0]'", "torch.int32"],
    ),
    "dci-mixed": (
        lambda: ops.damped_cholesky_inverse([t(2, 2), t(2, 2, dtype=F32)], 0.1),
        TypeError,
        ["'mats[1]'", "'mats[0]'", "share one dtype"],
    ),
    "dci-not-square": (
        lambda: ops.damped_cholesky_inverse([t(2, 3)], 0.1),
        ValueError,
        ["'mats[0]'", "square", "[2, 3]"],
    ),
    "dci-3d": (
        lambda: ops.damped_cholesky_inverse([t(2, 2, 2)], 0.1),
        ValueError,
        ["'mats[0]'", "[2, 2, 2]"],
    ),
    "dci-noncontig": (
        lambda: ops.damped_cholesky_inverse([noncontig(3, 3)], 0.1),
        ValueError,
        ["'mats[0]'", "contiguous"],
    ),
    "dci-meta": (
        lambda: ops.damped_cholesky_inverse([meta(3, 3)], 0.1),
        BackendUnavailable,
        ["'mats[0]'", "meta", "CPU"],
    ),
    "dci-damping-negative": (
        lambda: ops.damped_cholesky_inverse([t(2, 2)], -0.1),
        ValueError,
        ["'damping'", ">= 0", "-0.1"],
    ),
    "dci-damping-nan": (
        lambda: ops.damped_cholesky_inverse([t(2, 2)], float("nan")),
        ValueError,
        ["'damping'", "finite"],
    ),
    "dci-damping-length": (
        lambda: ops.damped_cholesky_inverse([t(2, 2)], [0.1, 0.2]),
        ValueError,
        ["'damping'", "got 2"],
    ),
    "dci-damping-type": (
        lambda: ops.damped_cholesky_inverse([t(2, 2)], "0.1"),
        TypeError,
        ["'damping'", "str"],
    ),
    "dci-max-tries": (
        lambda: ops.damped_cholesky_inverse([t(2, 2)], 0.1, max_tries=0),
        ValueError,
        ["'max_tries'", ">= 1", "0"],
    ),
    "dci-jitter": (
        lambda: ops.damped_cholesky_inverse([t(2, 2)], 0.1, jitter_factor=1.0),
        ValueError,
        ["'jitter_factor'", "> 1"],
    ),
    "dci-jitter-nan": (
        lambda: ops.damped_cholesky_inverse([t(2, 2)], 0.1, jitter_factor=float("nan")),
        ValueError,
        ["'jitter_factor'", "finite"],
    ),
    "dci-out-shape": (
        lambda: ops.damped_cholesky_inverse([t(2, 2)], 0.1, out=[t(3, 3)]),
        ValueError,
        ["'out[0]'", "[2, 2]", "[3, 3]"],
    ),
    "dci-out-dtype": (
        lambda: ops.damped_cholesky_inverse([t(2, 2)], 0.1, out=[t(2, 2, dtype=F32)]),
        ValueError,
        ["'out[0]'", "torch.float64", "torch.float32"],
    ),
    "dci-out-length": (
        lambda: ops.damped_cholesky_inverse([t(2, 2)], 0.1, out=[]),
        ValueError,
        ["'out'", "got 0"],
    ),
    "dci-out-not-list": (
        lambda: ops.damped_cholesky_inverse([t(2, 2)], 0.1, out=t(2, 2)),
        TypeError,
        ["'out'", "list of tensors"],
    ),
    "dci-out-noncontig": (
        lambda: ops.damped_cholesky_inverse([t(3, 3)], 0.1, out=[noncontig(3, 3)]),
        ValueError,
        ["'out[0]'", "contiguous"],
    ),
    "dci-out-meta": (
        lambda: ops.damped_cholesky_inverse([t(3, 3)], 0.1, out=[meta(3, 3)]),
        BackendUnavailable,
        ["'out[0]'", "meta"],
    ),
    "dci-out-alias": (
        lambda: (lambda m: ops.damped_cholesky_inverse([m], 0.1, out=[m]))(t(2, 2)),
        ValueError,
        ["'mats[0]'", "'out'", "memory"],
    ),
    "dci-errors": (
        lambda: ops.damped_cholesky_inverse([t(2, 2)], 0.1, errors="ignore"),
        ValueError,
        ["'errors'", "'ignore'"],
    ),
    "dci-not-pd-raise": (
        lambda: ops.damped_cholesky_inverse([-1e12 * torch.eye(3)], 0.1, errors="raise"),
        NumericalError,
        ["not positive definite", "[0]"],
    ),
    "dci-nan-raise": (
        lambda: ops.damped_cholesky_inverse(
            [torch.full((2, 2), float("nan"))], 0.1, errors="raise"
        ),
        NumericalError,
        ["not finite", "[0]"],
    ),
    # --- kron_precondition -----------------------------------------------------------------------
    "kp-nothing": (
        lambda: ops.kron_precondition(None, [t(2, 2)], [t(2, 2)]),
        ValueError,
        ["'grads'", "'inputs'", "'output_grads'"],
    ),
    "kp-half-batch": (
        lambda: ops.kron_precondition(None, [t(2, 2)], [t(2, 2)], inputs=[t(1, 2)]),
        ValueError,
        ["'inputs'", "'output_grads'", "together"],
    ),
    "kp-lengths": (
        lambda: ops.kron_precondition([t(2, 2)], [t(2, 2)], [t(2, 2), t(2, 2)]),
        ValueError,
        ["'g_inv'", "1 tensors", "got 2"],
    ),
    "kp-grads-lengths": (
        lambda: ops.kron_precondition([], [t(2, 2)], [t(2, 2)]),
        ValueError,
        ["'grads'", "got 0"],
    ),
    "kp-a-not-square": (
        lambda: ops.kron_precondition([t(2, 2)], [t(2, 3)], [t(2, 2)]),
        ValueError,
        ["'a_inv[0]'", "[2, 2]", "[2, 3]"],
    ),
    "kp-grads-shape": (
        lambda: ops.kron_precondition([t(3, 2)], [t(3, 3)], [t(2, 2)]),
        ValueError,
        ["'grads[0]'", "[2, 3]", "[3, 2]"],
    ),
    "kp-batch-mismatch": (
        lambda: ops.kron_precondition(
            None, [t(3, 3)], [t(2, 2)], inputs=[t(4, 3)], output_grads=[t(5, 2)]
        ),
        ValueError,
        ["'output_grads[0]'", "[4, 2]", "[5, 2]"],
    ),
    "kp-inputs-width": (
        lambda: ops.kron_precondition(
            None, [t(3, 3)], [t(2, 2)], inputs=[t(4, 2)], output_grads=[t(4, 2)]
        ),
        ValueError,
        ["'inputs[0]'", "[*, 3]", "[4, 2]"],
    ),
    "kp-mixed": (
        lambda: ops.kron_precondition([t(2, 2, dtype=F32)], [t(2, 2)], [t(2, 2)]),
        TypeError,
        ["'grads[0]'", "share one dtype"],
    ),
    "kp-noncontig": (
        lambda: ops.kron_precondition([noncontig(2, 3)], [t(3, 3)], [t(2, 2)]),
        ValueError,
        ["'grads[0]'", "contiguous"],
    ),
    "kp-meta": (
        lambda: ops.kron_precondition([meta(2, 3)], [meta(3, 3)], [meta(2, 2)]),
        BackendUnavailable,
        ["'a_inv[0]'", "meta"],
    ),
    "kp-meta-batch": (
        lambda: ops.kron_precondition(
            None,
            [t(3, 3, dtype=F32)],
            [t(2, 2, dtype=F32)],
            inputs=[meta(4, 3)],
            output_grads=[meta(4, 2)],
        ),
        BackendUnavailable,
        ["'inputs[0]'", "meta"],
    ),
    # --- sketch_accumulate -----------------------------------------------------------------------
    "sa-not-list": (
        lambda: ops.sketch_accumulate([t(4, 2)], t(1, 4), [t(4, 2)]),
        TypeError,
        ["'jacobians'"],
    ),
    "sa-lengths": (
        lambda: ops.sketch_accumulate([t(4, 2)], [t(1, 4)], []),
        ValueError,
        ["'omegas'", "1 tensors", "got 0"],
    ),
    "sa-omega-shape": (
        lambda: ops.sketch_accumulate([t(4, 2)], [t(1, 4)], [t(4, 3)]),
        ValueError,
        ["'omegas[0]'", "[4, 2]", "[4, 3]"],
    ),
    "sa-jacobian-width": (
        lambda: ops.sketch_accumulate([t(4, 2)], [t(1, 5)], [t(4, 2)]),
        ValueError,
        ["'jacobians[0]'", "[*, 4]", "[1, 5]"],
    ),
    "sa-dtype": (
        lambda: ops.sketch_accumulate(
            [t(4, 2, dtype=torch.bfloat16)],
            [t(1, 4, dtype=torch.bfloat16)],
            [t(4, 2, dtype=torch.bfloat16)],
        ),
        TypeError,
        ["'sketches[0]'", "torch.bfloat16"],
    ),
    "sa-mixed": (
        lambda: ops.sketch_accumulate([t(4, 2)], [t(1, 4)], [t(4, 2, dtype=F32)]),
        TypeError,
        ["'omegas[0]'", "share one dtype"],
    ),
    "sa-noncontig": (
        lambda: ops.sketch_accumulate([t(3, 2)], [noncontig(2, 3)], [t(3, 2)]),
        ValueError,
        ["'jacobians[0]'", "contiguous"],
    ),
    "sa-meta": (
        lambda: ops.sketch_accumulate([meta(4, 2)], [meta(1, 4)], [meta(4, 2)]),
        BackendUnavailable,
        ["'sketches[0]'", "meta"],
    ),
    "sa-decay-nan": (
        lambda: ops.sketch_accumulate([t(4, 2)], [t(1, 4)], [t(4, 2)], decay=float("nan")),
        ValueError,
        ["'decay'", "finite"],
    ),
    "sa-scale-length": (
        lambda: ops.sketch_accumulate([t(4, 2)], [t(1, 4)], [t(4, 2)], scale=[]),
        ValueError,
        ["'scale'", "got 0"],
    ),
    "sa-alias": (
        lambda: (lambda y: ops.sketch_accumulate([y], [t(1, 4)], [y]))(t(4, 2)),
        ValueError,
        ["'omegas[0]'", "'sketches'", "memory"],
    ),
    # --- nystrom ---------------------------------------------------------------------------------
    "ny-not-list": (lambda: ops.nystrom(t(4, 2), [t(4, 2)]), TypeError, ["'sketches'"]),
    "ny-lengths": (
        lambda: ops.nystrom([t(4, 2)], [t(4, 2), t(4, 2)]),
        ValueError,
        ["'omegas'", "got 2"],
    ),
    "ny-rank": (
        lambda: ops.nystrom([t(2, 3)], [t(2, 3)]),
        ValueError,
        ["'sketches[0]'", "r <= d", "[2, 3]"],
    ),
    "ny-omega-shape": (
        lambda: ops.nystrom([t(4, 2)], [t(4, 3)]),
        ValueError,
        ["'omegas[0]'", "[4, 2]", "[4, 3]"],
    ),
    "ny-dtype": (
        lambda: ops.nystrom([t(4, 2, dtype=torch.int64)], [t(4, 2, dtype=torch.int64)]),
        TypeError,
        ["'sketches[0]'", "torch.int64"],
    ),
    "ny-mixed": (
        lambda: ops.nystrom([t(4, 2, dtype=F32)], [t(4, 2)]),
        TypeError,
        ["'omegas[0]'", "share one dtype"],
    ),
    "ny-noncontig": (
        lambda: ops.nystrom([noncontig(3, 2)], [t(3, 2)]),
        ValueError,
        ["'sketches[0]'", "contiguous"],
    ),
    "ny-meta": (
        lambda: ops.nystrom([meta(4, 2)], [meta(4, 2)]),
        BackendUnavailable,
        ["'sketches[0]'", "meta"],
    ),
    "ny-shift-negative": (
        lambda: ops.nystrom([t(4, 2)], [t(4, 2)], shift=-1.0),
        ValueError,
        ["'shift'", ">= 0"],
    ),
    "ny-shift-nan": (
        lambda: ops.nystrom([t(4, 2)], [t(4, 2)], shift=float("nan")),
        ValueError,
        ["'shift'", "finite"],
    ),
    "ny-nan": (
        lambda: ops.nystrom(
            [torch.full((4, 2), float("nan"), dtype=F64)], [torch.randn(4, 2, dtype=F64)]
        ),
        ValueError,
        ["sketches [0]", "not finite"],
    ),
    "ny-not-psd": (
        lambda: (lambda om: ops.nystrom([-om], [om]))(torch.randn(6, 2, dtype=F64)),
        ValueError,
        ["sketches [0]", "PSD"],
    ),
    # --- lowrank_precondition --------------------------------------------------------------------
    "lr-not-list": (
        lambda: ops.lowrank_precondition([t(4, 2)], t(2), 1.0, [t(4)]),
        TypeError,
        ["'S'"],
    ),
    "lr-lengths": (
        lambda: ops.lowrank_precondition([t(4, 2)], [t(2)], 1.0, [t(4), t(4)]),
        ValueError,
        ["'V'", "1 tensors", "got 2"],
    ),
    "lr-damping-zero": (
        lambda: ops.lowrank_precondition([t(4, 2)], [t(2)], 0.0, [t(4)]),
        ValueError,
        ["'damping'", "> 0"],
    ),
    "lr-damping-inf": (
        lambda: ops.lowrank_precondition([t(4, 2)], [t(2)], float("inf"), [t(4)]),
        ValueError,
        ["'damping'", "finite"],
    ),
    "lr-damping-length": (
        lambda: ops.lowrank_precondition([t(4, 2)], [t(2)], [1.0, 2.0], [t(4)]),
        ValueError,
        ["'damping'", "got 2"],
    ),
    "lr-s-shape": (
        lambda: ops.lowrank_precondition([t(4, 2)], [t(3)], 1.0, [t(4)]),
        ValueError,
        ["'S[0]'", "[2]", "[3]"],
    ),
    "lr-v-rows": (
        lambda: ops.lowrank_precondition([t(4, 2)], [t(2)], 1.0, [t(5, 1)]),
        ValueError,
        ["'V[0]'", "[4, *]", "[5, 1]"],
    ),
    "lr-v-1d-rows": (
        lambda: ops.lowrank_precondition([t(4, 2)], [t(2)], 1.0, [t(5)]),
        ValueError,
        ["'V[0]'", "[4]", "[5]"],
    ),
    "lr-v-3d": (
        lambda: ops.lowrank_precondition([t(4, 2)], [t(2)], 1.0, [t(4, 1, 1)]),
        ValueError,
        ["'V[0]'", "[4, 1, 1]"],
    ),
    "lr-u-1d": (
        lambda: ops.lowrank_precondition([t(4)], [t(1)], 1.0, [t(4)]),
        ValueError,
        ["'U[0]'", "[4]"],
    ),
    "lr-mixed": (
        lambda: ops.lowrank_precondition([t(4, 2)], [t(2, dtype=F32)], 1.0, [t(4)]),
        TypeError,
        ["'S[0]'", "share one dtype"],
    ),
    "lr-noncontig": (
        lambda: ops.lowrank_precondition([noncontig(4, 2)], [t(2)], 1.0, [t(4)]),
        ValueError,
        ["'U[0]'", "contiguous"],
    ),
    "lr-meta": (
        lambda: ops.lowrank_precondition([meta(4, 2)], [meta(2)], 1.0, [meta(4)]),
        BackendUnavailable,
        ["'U[0]'", "meta"],
    ),
}

OP_OF_PREFIX = {"ka": KA, "dci": DCI, "kp": KP, "sa": SA, "ny": NY, "lr": LR}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_raises_clear_error(case: str) -> None:
    """Each bad call raises the documented exception type; the message names op and argument."""
    call, exc, needles = CASES[case]
    op = OP_OF_PREFIX[case.split("-")[0]]
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    assert msg.startswith(f"{op}: "), f"message must start with the op name: {msg!r}"
    for needle in needles:
        assert needle in msg, f"{needle!r} missing from {msg!r}"


def test_backend_unavailable_is_a_fedng_runtime_error() -> None:
    """BackendUnavailable is catchable as FedngError and RuntimeError, with a plain sentence."""
    with pytest.raises(FedngError) as info:
        ops.damped_cholesky_inverse([meta(3, 3)], 0.1)
    assert isinstance(info.value, RuntimeError)
    msg = str(info.value)
    assert "CPU kernels only" in msg and "move the tensors to the CPU" in msg


def test_numerical_error_is_a_fedng_arithmetic_error() -> None:
    """NumericalError is catchable as FedngError and ArithmeticError."""
    with pytest.raises(FedngError) as info:
        ops.damped_cholesky_inverse([torch.full((2, 2), float("inf"))], 0.1, errors="raise")
    assert isinstance(info.value, ArithmeticError) and isinstance(info.value, NumericalError)


def test_validation_happens_before_any_write() -> None:
    """A call failing validation on its last item leaves earlier in-place outputs untouched."""
    f0, f1 = torch.zeros(2, 2, dtype=F64), torch.zeros(3, 3, dtype=F64)
    with pytest.raises(ValueError):
        ops.kron_accumulate([f0, f1], [t(1, 2), t(1, 4)])
    assert torch.equal(f0, torch.zeros(2, 2, dtype=F64))
    y = torch.zeros(4, 2, dtype=F64)
    with pytest.raises(TypeError):
        ops.sketch_accumulate([y, t(4, 2)], [t(1, 4), t(1, 4)], [t(4, 2), t(4, 2, dtype=F32)])
    assert torch.equal(y, torch.zeros(4, 2, dtype=F64))


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda: ops.kron_accumulate((t(2, 2),), (t(1, 2),)), id="kron_accumulate"),
        pytest.param(lambda: ops.damped_cholesky_inverse((t(2, 2),), (0.1,)), id="dci"),
        pytest.param(lambda: ops.kron_precondition((t(2, 2),), (t(2, 2),), (t(2, 2),)), id="kp"),
        pytest.param(lambda: ops.sketch_accumulate((t(4, 2),), (t(1, 4),), (t(4, 2),)), id="sa"),
        pytest.param(
            lambda: ops.nystrom((torch.eye(4, 2, dtype=F64),), (torch.eye(4, 2, dtype=F64),)),
            id="nystrom",
        ),
        pytest.param(
            lambda: ops.lowrank_precondition((t(4, 2),), (t(2),), 1.0, (t(4),)), id="lowrank"
        ),
    ],
)
def test_tuples_are_accepted_as_lists(call: Callable[[], object]) -> None:
    """Any sequence of tensors is a valid ragged list (a tuple is not rejected as 'not a list')."""
    assert call() is not None
