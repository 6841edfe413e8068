"""FedProx Synthetic(alpha, beta) (Li et al., 2020), exactly as defined there.

For client k (alpha, beta are standard deviations):
    u_k ~ N(0, alpha^2),  W_k ~ N(u_k, 1) [60 x 10] elementwise,  b_k ~ N(u_k, 1) [10]
    B_k ~ N(0, beta^2),   v_k ~ N(B_k, 1) [60] elementwise
    x ~ N(v_k, Sigma) with Sigma diagonal, Sigma_jj = j^-1.2 (j = 1..60)
    y = argmax softmax(W_k^T x + b_k)
    n_k = floor(lognormal(4, 2)) + 50 examples, split 90/10 into train/test.
The IID variant shares one W ~ N(0, 1), b ~ N(0, 1) across clients and draws x ~ N(0, Sigma).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedng.federated.tasks.base import ClientData, FederatedTask, seeded_model
from fedng.federated.tasks.partition import holdout

DIM = 60
CLASSES = 10


@dataclass
class SyntheticDraw:
    """Every latent quantity of one Synthetic draw (for tests of the generator).

    Attributes:
        u: [K] client means of W and b.
        B: [K] client means of v.
        v: [K, 60] client feature means.
        W: [K, 60, 10] client weights.
        b: [K, 10] client biases.
        sizes: [K] examples per client.
        xs: K arrays [n_k, 60].
        ys: K arrays [n_k] (int64).
        cov_diag: [60], Sigma_jj = j^-1.2.
    """

    u: np.ndarray
    B: np.ndarray
    v: np.ndarray
    W: np.ndarray
    b: np.ndarray
    sizes: np.ndarray
    xs: list[np.ndarray]
    ys: list[np.ndarray]
    cov_diag: np.ndarray


def draw_synthetic(
    alpha: float,
    beta: float,
    num_clients: int = 30,
    iid: bool = False,
    seed: int = 0,
    max_size: int | None = None,
) -> SyntheticDraw:
    """Draws the Synthetic(alpha, beta) data set.

    Args:
        alpha: std of u_k (model heterogeneity), >= 0.
        beta: std of B_k (feature heterogeneity), >= 0.
        num_clients: K.
        iid: the IID variant (shared W, b; x ~ N(0, Sigma)).
        seed: numpy seed.
        max_size: optional cap on n_k (None: as in the paper).

    Returns:
        The `SyntheticDraw`.
    """
    if not (alpha >= 0 and beta >= 0):
        raise ValueError(f"draw_synthetic: 'alpha' and 'beta' must be >= 0, got {alpha}, {beta}")
    if num_clients < 1:
        raise ValueError(f"draw_synthetic: 'num_clients' must be >= 1, got {num_clients}")
    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(4, 2, num_clients).astype(np.int64) + 50
    if max_size is not None:
        sizes = np.minimum(sizes, max_size)
    u = rng.normal(0, alpha, num_clients)
    B = rng.normal(0, beta, num_clients)
    cov_diag = np.arange(1, DIM + 1, dtype=np.float64) ** -1.2
    v = np.zeros((num_clients, DIM)) if iid else rng.normal(B[:, None], 1.0, (num_clients, DIM))
    if iid:
        w_glob = rng.normal(0, 1, (DIM, CLASSES))
        b_glob = rng.normal(0, 1, CLASSES)
        W = np.broadcast_to(w_glob, (num_clients, DIM, CLASSES)).copy()
        b = np.broadcast_to(b_glob, (num_clients, CLASSES)).copy()
    else:
        W = rng.normal(u[:, None, None], 1.0, (num_clients, DIM, CLASSES))
        b = rng.normal(u[:, None], 1.0, (num_clients, CLASSES))
    xs, ys = [], []
    for k in range(num_clients):
        x = v[k] + rng.standard_normal((int(sizes[k]), DIM)) * np.sqrt(cov_diag)
        xs.append(x)
        ys.append(np.argmax(x @ W[k] + b[k], axis=1).astype(np.int64))
    return SyntheticDraw(u, B, v, W, b, sizes, xs, ys, cov_diag)


def synthetic_task(
    alpha: float = 1.0,
    beta: float = 1.0,
    num_clients: int = 30,
    iid: bool = False,
    seed: int = 0,
    val_fraction: float = 0.1,
    max_size: int | None = None,
) -> FederatedTask:
    """The Synthetic(alpha, beta) task: multinomial logistic regression, 60 -> 10.

    Each client's examples are split 90/10 into train/test (the global test set is the union of
    the clients' test parts); `val_fraction` of each train part is held out for tuning.
    """
    d = draw_synthetic(alpha, beta, num_clients, iid, seed, max_size)
    rng = np.random.default_rng(seed + 1)
    clients, tx, ty = [], [], []
    for k in range(num_clients):
        idx = np.arange(int(d.sizes[k]))
        train, test = holdout(idx, 0.1, rng)
        train, val = holdout(train, val_fraction, rng)
        x = torch.from_numpy(d.xs[k]).float()
        y = torch.from_numpy(d.ys[k])
        clients.append(ClientData(k, x[train], y[train], x[val], y[val]))
        tx.append(x[test])
        ty.append(y[test])
    name = "synthetic_iid" if iid else f"synthetic({alpha:g},{beta:g})"
    return FederatedTask(
        name=name,
        clients=clients,
        x_test=torch.cat(tx),
        y_test=torch.cat(ty),
        model_fn=lambda s: seeded_model(lambda: nn.Linear(DIM, CLASSES), s),
        loss="cross_entropy",
        metric="accuracy",
        num_classes=CLASSES,
        info={"alpha": alpha, "beta": beta, "iid": iid, "sizes": d.sizes.tolist()},
    )
