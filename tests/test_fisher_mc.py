"""The Monte-Carlo Fisher converges to the exact Fisher of a small softmax (and Gaussian) model.

Exact Fisher of softmax regression at input x: `sum_c p_c grad log p_c grad log p_c^T`, computed
by enumerating the classes. Each input is repeated R times so every copy draws its own label;
the estimate's error must fall as R grows and be small at the largest R.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fedng.curvature.fisher import sample_targets, sampled_loss
from fedng.errors import CurvatureWarning
from fedng.optim.natural_gradient import NaturalGradient
from torch import nn

F64 = torch.float64
TOL = {"large_r": 0.05}
REPEATS = (8, 16384)


def softmax_model() -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(30)
    model = nn.Linear(3, 4).double()
    with torch.no_grad():
        model.weight.mul_(3.0)
    return model, torch.randn(5, 3, dtype=F64)


def exact_fisher(model: nn.Linear, xs: torch.Tensor) -> torch.Tensor:
    """Mean over inputs of sum_c p_c v_c v_c^T, v_c = grad log p_c in the [m, n+1] layout."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    total = torch.zeros(16, 16, dtype=F64)
    for x in xs:
        probs = torch.softmax(model(x).detach(), -1)
        for c in range(4):
            g = torch.func.grad(
                lambda p, c=c, x=x: torch.log_softmax(
                    torch.func.functional_call(model, p, (x,)), -1
                )[c]
            )(params)
            v = torch.cat([g["weight"], g["bias"][:, None]], 1).reshape(-1)
            total += probs[c] * torch.outer(v, v)
    return total / len(xs)


def mc_estimate(model: nn.Linear, xs: torch.Tensor, repeats: int, curvature: str) -> torch.Tensor:
    ng = NaturalGradient(model, curvature=curvature, fisher_type="mc", sketch_seed=repeats)
    x = xs.repeat(repeats, 1)
    out = model(x)
    ng.mc_backward(out)
    F.cross_entropy(out, torch.zeros(len(x), dtype=torch.long)).backward()  # the real labels
    ng.step()
    model.zero_grad()
    rep = ng.representations[curvature]
    ng.remove()
    if curvature == "diag":
        return rep.diag[0].reshape(-1)
    return torch.kron(rep.G[0], rep.A[0])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_mc_diagonal_converges_to_the_exact_fisher_diagonal() -> None:
    model, xs = softmax_model()
    exact = exact_fisher(model, xs).diagonal()
    errors = [rel(mc_estimate(model, xs, r, "diag"), exact) for r in REPEATS]
    assert errors[1] < TOL["large_r"], errors
    assert errors[1] < errors[0] / 4, errors


def test_mc_kfac_at_one_input_converges_to_the_exact_fisher() -> None:
    # at a single input the softmax Fisher is exactly (diag(p) - p p^T) ⊗ x x^T: K-FAC's form
    model, xs = softmax_model()
    one = xs[:1]
    exact = exact_fisher(model, one)
    errors = [rel(mc_estimate(model, one, r, "kfac"), exact) for r in REPEATS]
    assert errors[1] < TOL["large_r"], errors
    assert errors[1] < errors[0] / 4, errors


def test_empirical_fisher_differs_from_the_true_one() -> None:
    model, xs = softmax_model()
    exact = exact_fisher(model, xs[:1])
    ng = NaturalGradient(model, fisher_type="empirical")
    x = xs[:1].repeat(64, 1)
    F.cross_entropy(model(x), torch.zeros(64, dtype=torch.long)).backward()
    ng.step()
    k = ng.representations["kfac"]
    assert rel(torch.kron(k.G[0], k.A[0]), exact) > 0.5  # one fixed label is not the model's


def test_mse_mc_fisher_is_the_gaussian_identity() -> None:
    torch.manual_seed(31)
    model = nn.Linear(3, 2).double()
    ng = NaturalGradient(model, fisher_type="mc", loss="mse", sketch_seed=4)
    x = torch.randn(4096, 3, dtype=F64)
    out = model(x)
    ng.mc_backward(out)
    F.mse_loss(out, torch.zeros_like(out)).backward()
    ng.step()
    g = ng.representations["kfac"].G[0]  # E[eps eps^T] for eps ~ N(0, I)
    assert rel(g, torch.eye(2, dtype=F64)) < TOL["large_r"]


def test_sample_targets_follow_the_predictive_distribution() -> None:
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.7]], dtype=F64)).repeat(20000, 1)
    gen = torch.Generator().manual_seed(32)
    labels = sample_targets(logits, "cross_entropy", gen)
    freq = torch.bincount(labels, minlength=3).to(F64) / len(labels)
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.2, 0.7], dtype=F64), atol=0.01, rtol=0)
    with pytest.raises(ValueError, match="'loss' must be one of"):
        sampled_loss(logits, "hinge")  # type: ignore[arg-type]


def test_sample_targets_of_diverged_logits_draw_uniformly_instead_of_raising() -> None:
    """A diverged model (NaN / inf logits) once made multinomial raise inside the MC pass."""
    logits = torch.tensor([[0.0, 1.0, 2.0], [float("nan"), 0.0, 1.0], [float("inf"), 0.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    labels = sample_targets(logits.repeat(200, 1), "cross_entropy", gen)
    assert labels.shape == (600,) and int(labels.min()) >= 0 and int(labels.max()) <= 2
    # the broken rows are uniform, not stuck on one class
    assert len(set(labels[1::3].tolist())) == 3 and len(set(labels[2::3].tolist())) == 3


def test_mc_step_of_a_diverged_model_is_skipped_not_raised() -> None:
    """The MC-Fisher federated case: NaN outputs -> the step is skipped and counted."""
    model = nn.Linear(3, 4)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    ng = NaturalGradient(model, fisher_type="mc")
    out = model(torch.randn(5, 3))
    ng.mc_backward(out, torch.Generator().manual_seed(1))
    F.cross_entropy(out, torch.zeros(5, dtype=torch.long)).backward()
    with pytest.warns(CurvatureWarning, match="skipped"):
        ng.step()
    assert ng.last["skipped"] and ng.stats["skipped_steps"] == 1
    assert all(p.grad is None for p in model.parameters())
