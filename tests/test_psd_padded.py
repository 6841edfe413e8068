"""`psd.shifted_cholesky`: the factor of `M + shift I`, padded where MKL is slow, and the PSD
test that uses it."""

from __future__ import annotations

import pytest
import torch
from _tols import DTYPES, assert_close
from fedng.curvature.validation import PsdCheck
from fedng.federated.aggregation.psd import LARGE, PAD, PAD_EVERY, psd_tests, shifted_cholesky


def _spd(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2 * n, generator=gen, dtype=torch.float64)
    return (x @ x.T / n).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [7, LARGE - 1, LARGE, LARGE + PAD_EVERY, 2 * LARGE + 1])
def test_shifted_cholesky_is_the_factor_of_the_shifted_matrix(dtype: torch.dtype, n: int) -> None:
    m = _spd(n, dtype, n)
    before = m.clone()
    low, info = shifted_cholesky(m, 0.25)
    assert info == 0
    assert torch.equal(m, before)  # the input is not modified
    ref = torch.linalg.cholesky(m.double() + 0.25 * torch.eye(n, dtype=torch.float64))
    assert_close(low, ref, dtype, "damped_cholesky_inverse")
    assert torch.equal(low, low.tril())
    padded = n >= LARGE and n % PAD_EVERY == 0
    width = n + PAD if padded else n  # the padded path is the one taken
    assert low.untyped_storage().nbytes() == width * width * low.element_size()
    shifted = m.clone()
    shifted.diagonal().add_(0.25)
    plain = torch.linalg.cholesky_ex(shifted).L  # what the server computed before
    assert_close(low, plain.double(), dtype, "damped_cholesky_inverse")


@pytest.mark.parametrize("n", [LARGE - 1, LARGE, 3 * PAD_EVERY * 2])
def test_shifted_cholesky_fails_on_an_indefinite_matrix(n: int) -> None:
    m = _spd(n, torch.float32, 1)
    lam_min = float(torch.linalg.eigvalsh(m.double())[0])
    m[n // 2, n // 2] -= 50.0  # an eigenvalue well below zero
    assert shifted_cholesky(m, 0.0)[1] != 0
    assert shifted_cholesky(m, 60.0)[1] == 0
    good = _spd(n, torch.float32, 2)
    assert shifted_cholesky(good, 0.0)[1] == 0
    assert lam_min > 0


@pytest.mark.parametrize("n", [LARGE, LARGE + 1])
def test_psd_tests_pass_psd_and_name_the_indefinite(n: int) -> None:
    good = _spd(n, torch.float32, 3)
    psd_tests([PsdCheck("good", good.clone(), 1e-6)])
    bad = good.clone()
    bad[3, 3] -= 50.0
    with pytest.raises(ValueError, match="'bad block' is not positive semi-definite"):
        psd_tests([PsdCheck("good", good.clone(), 1e-6), PsdCheck("'bad block'", bad, 1e-6)])
    # the shift decides: a matrix PSD within it passes
    psd_tests([PsdCheck("shifted", bad, 60.0)])


@pytest.mark.parametrize("shift", [float("inf"), float("nan")])
def test_shifted_cholesky_gives_lapacks_verdict_on_a_non_finite_shift(shift: float) -> None:
    m = _spd(LARGE, torch.float32, 4)  # a padded width
    shifted = m.clone()
    shifted.diagonal().add_(shift)
    assert shifted_cholesky(m, shift)[1] == int(torch.linalg.cholesky_ex(shifted).info)
