"""kron_precondition: G_i^-1 dW_i A_i^-1, dense form and batch (factored) form."""

from __future__ import annotations

import pytest
import torch
from _tols import DTYPES, assert_close
from fedng import reference
from fedng.ops import kron_precondition
from hypothesis import given
from hypothesis import strategies as st

OP = "kron_precondition"

# (m_i, n_i, B_i) per layer; zero sizes, size 1, B = 0 and B above the layer widths all occur.
layers = st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9), st.integers(0, 14)), max_size=4)


def _sym(n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(n, n, dtype=torch.float64, generator=gen)
    return (a @ a.T / max(n, 1) + torch.eye(n, dtype=torch.float64)).to(dtype)


def _rand(gen: torch.Generator, dtype: torch.dtype, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=gen).to(dtype)


def _problem(mnb: list[tuple[int, int, int]], dtype: torch.dtype, seed: int) -> dict[str, list]:
    gen = torch.Generator().manual_seed(seed)
    p: dict[str, list] = {"a_inv": [], "g_inv": [], "inputs": [], "output_grads": [], "grads": []}
    for m, n, b in mnb:
        p["a_inv"].append(_sym(n, dtype, gen))
        p["g_inv"].append(_sym(m, dtype, gen))
        ab, gb = _rand(gen, dtype, b, n), _rand(gen, dtype, b, m)
        p["inputs"].append(ab)
        p["output_grads"].append(gb)
        # The dense gradient consistent with the batch, rounded to the op's dtype.
        p["grads"].append((gb.double().T @ ab.double()).to(dtype))
    return p


@pytest.mark.parametrize("dtype", DTYPES)
@given(mnb=layers, seed=st.integers(0, 2**31 - 1))
def test_dense_form_matches_reference(
    dtype: torch.dtype, mnb: list[tuple[int, int, int]], seed: int
) -> None:
    """grads only: out_i = g_inv_i grads_i a_inv_i for ragged layers (empty, sizes 0 and 1)."""
    p = _problem(mnb, dtype, seed)
    out = kron_precondition(p["grads"], p["a_inv"], p["g_inv"])
    expected = reference.kron_precondition_ref(p["grads"], p["a_inv"], p["g_inv"])
    assert len(out) == len(mnb)
    for o, e in zip(out, expected, strict=True):
        assert_close(o, e, dtype, OP)


@pytest.mark.parametrize("dtype", DTYPES)
@given(mnb=layers, seed=st.integers(0, 2**31 - 1))
def test_batch_form_matches_reference(
    dtype: torch.dtype, mnb: list[tuple[int, int, int]], seed: int
) -> None:
    """inputs/output_grads only (grads=None): (Gb g_inv)^T (Ab a_inv), B=0 giving zeros."""
    p = _problem(mnb, dtype, seed)
    out = kron_precondition(
        None, p["a_inv"], p["g_inv"], inputs=p["inputs"], output_grads=p["output_grads"]
    )
    expected = reference.kron_precondition_ref(
        None, p["a_inv"], p["g_inv"], inputs=p["inputs"], output_grads=p["output_grads"]
    )
    for o, e in zip(out, expected, strict=True):
        assert_close(o, e, dtype, OP)


@pytest.mark.parametrize("dtype", DTYPES)
@given(mnb=layers, seed=st.integers(0, 2**31 - 1))
def test_both_forms_given_match_reference(
    dtype: torch.dtype, mnb: list[tuple[int, int, int]], seed: int
) -> None:
    """grads and batch factors together (consistent): whichever form is chosen, same result."""
    p = _problem(mnb, dtype, seed)
    out = kron_precondition(
        p["grads"], p["a_inv"], p["g_inv"], inputs=p["inputs"], output_grads=p["output_grads"]
    )
    expected = reference.kron_precondition_ref(p["grads"], p["a_inv"], p["g_inv"])
    for o, e in zip(out, expected, strict=True):
        # grads was rounded to dtype, Gb^T Ab in the batch form is not: both are within tolerance.
        assert_close(o, e, dtype, OP)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("m", "n", "b"), [(3, 4, 50), (40, 30, 2), (64, 65, 0), (1, 1, 1), (130, 20, 7), (20, 130, 300)]
)
def test_larger_layers(dtype: torch.dtype, m: int, n: int, b: int) -> None:
    """Both forms at larger sizes, batch smaller and larger than the layer, equal the reference."""
    p = _problem([(m, n, b)], dtype, m * 1000 + n)
    expected = reference.kron_precondition_ref(p["grads"], p["a_inv"], p["g_inv"])
    dense = kron_precondition(p["grads"], p["a_inv"], p["g_inv"])
    batch = kron_precondition(
        None, p["a_inv"], p["g_inv"], inputs=p["inputs"], output_grads=p["output_grads"]
    )
    both = kron_precondition(
        p["grads"], p["a_inv"], p["g_inv"], inputs=p["inputs"], output_grads=p["output_grads"]
    )
    for o in (dense, batch, both):
        assert_close(o[0], expected[0], dtype, OP)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cheaper_form_is_chosen_per_layer(dtype: torch.dtype) -> None:
    """With both forms given, a batch larger than the layer uses grads (dense form) and a small
    batch uses the factors (batch form). Deliberately inconsistent inputs make the choice visible.
    """
    gen = torch.Generator().manual_seed(7)
    m, n = 6, 5
    a, g = _sym(n, dtype, gen), _sym(m, dtype, gen)
    grads = _rand(gen, dtype, m, n)
    big_ab, big_gb = _rand(gen, dtype, 100, n), _rand(gen, dtype, 100, m)  # B > m, n: dense
    small_ab, small_gb = _rand(gen, dtype, 1, n), _rand(gen, dtype, 1, m)  # B = 1: batch
    out = kron_precondition(
        [grads, grads], [a, a], [g, g], inputs=[big_ab, small_ab], output_grads=[big_gb, small_gb]
    )
    dense_ref = reference.kron_precondition_ref([grads], [a], [g])[0]
    batch_ref = reference.kron_precondition_ref(
        None, [a], [g], inputs=[small_ab], output_grads=[small_gb]
    )[0]
    assert_close(out[0], dense_ref, dtype, OP)
    assert_close(out[1], batch_ref, dtype, OP)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nonsymmetric_inverses(dtype: torch.dtype) -> None:
    """Both forms compute g_inv @ W @ a_inv literally (no symmetry assumed about the inverses)."""
    gen = torch.Generator().manual_seed(8)
    a, g = _rand(gen, dtype, 4, 4), _rand(gen, dtype, 3, 3)
    ab, gb = _rand(gen, dtype, 2, 4), _rand(gen, dtype, 2, 3)
    expected = reference.kron_precondition_ref(None, [a], [g], inputs=[ab], output_grads=[gb])[0]
    out = kron_precondition(None, [a], [g], inputs=[ab], output_grads=[gb])[0]
    assert_close(out, expected, dtype, OP)
    w = (gb.double().T @ ab.double()).to(dtype)
    dense = kron_precondition([w], [a], [g])[0]
    assert_close(dense, reference.kron_precondition_ref([w], [a], [g])[0], dtype, OP)


def test_inputs_not_modified_and_outputs_new() -> None:
    """Inputs stay untouched; outputs are fresh tensors of shape [m, n]."""
    p = _problem([(3, 4, 2), (5, 2, 9)], torch.float64, 9)
    before = {k: [t.clone() for t in v] for k, v in p.items()}
    out = kron_precondition(
        p["grads"], p["a_inv"], p["g_inv"], inputs=p["inputs"], output_grads=p["output_grads"]
    )
    assert [tuple(o.shape) for o in out] == [(3, 4), (5, 2)]
    for k, v in p.items():
        assert all(torch.equal(x, y) for x, y in zip(v, before[k], strict=True))
        assert all(o.data_ptr() != t.data_ptr() for o in out for t in v if t.numel())
