"""Partitioners: which examples each client holds (label skew, quantity skew, domain split).

All take a `numpy.random.Generator` and return one int64 index array per client; together they
cover every example exactly once.
"""

from __future__ import annotations

import numpy as np

_MAX_TRIES = 1000


def _check_clients(where: str, num_clients: int, n: int) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"{where}: 'num_clients' must be an int >= 1, got {num_clients!r}")
    if n < num_clients:
        raise ValueError(f"{where}: {n} examples cannot give each of {num_clients} clients one")


def dirichlet_label_skew(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 10,
) -> list[np.ndarray]:
    """Label skew (Hsu et al. 2019): for each class, client shares ~ Dirichlet(alpha * 1).

    Draws are repeated until every client has at least `min_size` examples (lowered to what the
    data allows); small alpha gives clients few classes each.

    Args:
        labels: [n] int class labels.
        num_clients: K.
        alpha: Dirichlet concentration (> 0); large alpha approaches IID.
        rng: the random generator.
        min_size: minimum examples per client.

    Returns:
        K index arrays.
    """
    labels = np.asarray(labels)
    _check_clients("dirichlet_label_skew", num_clients, labels.shape[0])
    if not alpha > 0:
        raise ValueError(f"dirichlet_label_skew: 'alpha' must be > 0, got {alpha!r}")
    min_size = min(min_size, labels.shape[0] // num_clients)
    classes = np.unique(labels)
    for _ in range(_MAX_TRIES):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            share = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(share)[:-1] * idx.size).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            break
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def quantity_skew(
    n: int, num_clients: int, sigma: float, rng: np.random.Generator, min_size: int = 10
) -> list[np.ndarray]:
    """Quantity skew with IID labels: client sizes proportional to lognormal(0, sigma) draws.

    Args:
        n: examples.
        num_clients: K.
        sigma: lognormal spread (0 = equal sizes).
        rng: the random generator.
        min_size: minimum examples per client.

    Returns:
        K index arrays.
    """
    _check_clients("quantity_skew", num_clients, n)
    if not sigma >= 0:
        raise ValueError(f"quantity_skew: 'sigma' must be >= 0, got {sigma!r}")
    min_size = min(min_size, n // num_clients)
    w = rng.lognormal(0.0, sigma, num_clients)
    spare = n - min_size * num_clients
    sizes = min_size + np.floor(w / w.sum() * spare).astype(int)
    sizes[np.argmax(w)] += n - sizes.sum()
    perm = rng.permutation(n)
    return [np.sort(p) for p in np.split(perm, np.cumsum(sizes)[:-1])]


def domain_split(keys: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """Domain split: sorts examples by a scalar key and gives each client a contiguous range.

    With `keys` the input coordinate of a 1-D regression, client k owns the k-th sub-interval.

    Args:
        keys: [n] scalar keys.
        num_clients: K.

    Returns:
        K index arrays of (almost) equal size, ordered by key.
    """
    keys = np.asarray(keys)
    _check_clients("domain_split", num_clients, keys.shape[0])
    order = np.argsort(keys, kind="stable")
    return [np.sort(p) for p in np.array_split(order, num_clients)]


def holdout(
    idx: np.ndarray, fraction: float, rng: np.random.Generator, min_keep: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Splits a client's indices into (kept, held out), holding out `fraction` of them.

    Args:
        idx: the client's indices.
        fraction: share held out, in [0, 1).
        rng: the random generator.
        min_keep: at least this many stay in the kept part.

    Returns:
        (kept, held_out), each sorted.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"holdout: 'fraction' must be in [0, 1), got {fraction!r}")
    perm = rng.permutation(idx)
    k = min(round(fraction * perm.size), max(0, perm.size - min_keep))
    return np.sort(perm[k:]), np.sort(perm[:k])
