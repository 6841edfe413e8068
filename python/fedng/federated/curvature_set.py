"""A model's curvature for federated use: one representation per kind over its blocks.

`CurvatureSet` splits a model's blocks by curvature kind (K-FAC, diagonal, low-rank; chosen per
layer by `fedng.optim.config.assign`, as `NaturalGradient` does), forwards every operation to one
representation per kind (each does one ragged native call for all its blocks), and converts to
and from named arrays for the wire: the factor payloads (uplink, and the downlink of
`global_local`) and the damped inverses (the downlink of the `global` preconditioner).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedng import ops
from fedng.curvature import KFAC, DiagonalFisher, FisherRepresentation, LowRankFisher, Payload
from fedng.curvature.stats import BlockStats
from fedng.federated.layout import BlockLayout

Arrays = dict[str, torch.Tensor]
_MAX_ABS = 1e18
KINDS: tuple[str, ...] = ("kfac", "diag", "lowrank")


def _new_rep(kind: str, layouts: list[BlockLayout], rank: int, seed: int) -> FisherRepresentation:
    specs = [lay.spec for lay in layouts]
    if kind == "kfac":
        return KFAC(specs)
    if kind == "diag":
        return DiagonalFisher(specs)
    return LowRankFisher(specs, rank=rank, seed=seed)


@dataclass
class CurvatureSet:
    """Per-kind representations over a model's blocks.

    Attributes:
        layouts: every block, in capture order.
        kinds: the kind of each block.
        groups: kind -> indices of its blocks (in `layouts`).
        reps: kind -> its representation (over exactly those blocks, in that order).
    """

    layouts: list[BlockLayout]
    kinds: list[str]
    groups: dict[str, list[int]] = field(default_factory=dict)
    reps: dict[str, FisherRepresentation] = field(default_factory=dict)

    @staticmethod
    def empty(
        layouts: list[BlockLayout], kinds: list[str], rank: int = 16, seed: int = 0
    ) -> CurvatureSet:
        """Zero curvature for these blocks."""
        cs = CurvatureSet(list(layouts), list(kinds))
        for kind in KINDS:
            idx = [i for i, k in enumerate(kinds) if k == kind]
            if idx:
                cs.groups[kind] = idx
                cs.reps[kind] = _new_rep(kind, [layouts[i] for i in idx], rank, seed)
        return cs

    def _split(self, items: Sequence[Any], kind: str) -> list[Any]:
        return [items[i] for i in self.groups[kind]]

    def update(self, stats: Sequence[BlockStats | None], decay: float | None) -> None:
        """Folds one batch's statistics into every representation."""
        for kind, rep in self.reps.items():
            rep.update(self._split(stats, kind), decay)

    def inverse(self, damping: float) -> list[str]:
        """Damped inverses of every representation; returns the blocks that failed to invert."""
        failed = []
        for rep in self.reps.values():
            failed += rep.inverse(damping).failed
        return failed

    def precondition(
        self, grads: Sequence[torch.Tensor | None], stats: Sequence[BlockStats | None] | None = None
    ) -> list[torch.Tensor | None]:
        """Preconditioned block gradients (None where a block has no inverse or no gradient)."""
        out: list[torch.Tensor | None] = [None] * len(self.layouts)
        for kind, rep in self.reps.items():
            res = rep.precondition(
                self._split(grads, kind), None if stats is None else self._split(stats, kind)
            )
            for i, p in zip(self.groups[kind], res, strict=True):
                out[i] = p
        return out

    def quadratic(self, vectors: Sequence[torch.Tensor | None]) -> float:
        """`sum_i v_i^T F_i v_i` over all blocks (undamped)."""
        return sum(rep.quadratic(self._split(vectors, k)) for k, rep in self.reps.items())

    @staticmethod
    def combine(sets: Sequence[CurvatureSet], weights: Sequence[float]) -> CurvatureSet:
        """`sum_k w_k F_k` per kind (exact; sets must share blocks and kinds)."""
        first = sets[0]
        for s in sets[1:]:
            if s.kinds != first.kinds or [x.spec for x in s.layouts] != [
                x.spec for x in first.layouts
            ]:
                raise ValueError("CurvatureSet.combine: sets have different blocks or kinds")
        out = CurvatureSet(first.layouts, first.kinds, dict(first.groups))
        for kind, rep in first.reps.items():
            out.reps[kind] = type(rep).aggregate([s.reps[kind] for s in sets], list(weights))
        return out

    def validate(self, tol: float = 1e-3, wire_eps: float = 0.0) -> None:
        """Checks a received payload: finite, not overflowing float32 arithmetic, symmetric and
        positive semi-definite within tolerance.

        The tolerance is relative to each matrix's scale, `max(tol, n * wire_eps) * max|M|` for
        an n x n matrix, not a few float32 ulps as `FisherRepresentation.validate` uses: a
        bf16/fp16 payload is rounded to 8 or 11 bits, which moves eigenvalues by up to
        `n * eps * max|M|`, so a PSD factor with small eigenvalues can arrive slightly
        indefinite, and that is not an attack. The PSD tests are one ragged
        `damped_cholesky_inverse` call (that shift, no escalation).

        Args:
            tol: relative tolerance.
            wire_eps: machine epsilon of the dtype the payload travelled in.

        Raises:
            ValueError: naming the kind and block.
        """
        mats: list[torch.Tensor] = []
        shifts: list[float] = []
        labels: list[str] = []
        for kind, rep in self.reps.items():
            for j, i in enumerate(self.groups[kind]):
                label = f"{kind} block '{self.layouts[i].name}'"
                if isinstance(rep, KFAC):
                    items = [("A", rep.A[j]), ("G", rep.G[j])]
                elif isinstance(rep, DiagonalFisher):
                    items = [("diag", rep.diag[j])]
                else:
                    if not isinstance(rep, LowRankFisher):
                        raise TypeError(f"expected a LowRankFisher block, got {type(rep).__name__}")
                    items = [("sketch", rep.Y[j])]
                for tag, t in items:
                    if not bool(torch.isfinite(t).all()):
                        raise ValueError(f"{label} {tag} has NaN/Inf entries")
                    big = float(t.abs().max()) if t.numel() else 0.0
                    if big > _MAX_ABS:
                        raise ValueError(
                            f"{label} {tag} has entries of size {big:.3g}"
                            f" (> {_MAX_ABS:g}: its products overflow float32)"
                        )
                    if t.dim() == 1 or tag == "diag":
                        if t.numel() and float(t.min()) < -tol * big:
                            raise ValueError(
                                f"{label} {tag} has a negative entry {float(t.min()):.3e}"
                            )
                        continue
                    if tag == "sketch":
                        if not isinstance(rep, LowRankFisher):
                            raise TypeError(
                                f"expected a LowRankFisher block, got {type(rep).__name__}"
                            )
                        t = rep.omega[j].T @ t
                        big = float(t.abs().max()) if t.numel() else 0.0
                    rel = max(tol, t.shape[0] * wire_eps)
                    asym = float((t - t.T).abs().max()) if t.numel() else 0.0
                    if asym > rel * big:
                        raise ValueError(
                            f"{label} {tag} is not symmetric (max |M - M^T| = {asym:.3e})"
                        )
                    mats.append(((t + t.T) / 2).float().contiguous())
                    shifts.append(rel * big + 1e-30)
                    labels.append(f"{label} {tag}")
        if mats:
            res = ops.damped_cholesky_inverse(mats, shifts, max_tries=1)
            for label, st in zip(labels, res.status.tolist(), strict=True):
                if st != 0:
                    raise ValueError(f"{label} is not positive semi-definite within tolerance")

    def trace(self) -> float:
        """tr(F) summed over blocks (a Hutchinson estimate for sketches), for sanity checks."""
        total = 0.0
        for rep in self.reps.values():
            if isinstance(rep, KFAC):
                for a, g in zip(rep.A, rep.G, strict=True):
                    ta = float(a.sum()) if a.dim() == 1 else float(a.diagonal().sum())
                    total += ta * float(g.diagonal().sum())
            elif isinstance(rep, DiagonalFisher):
                total += sum(float(d.sum()) for d in rep.diag)
            elif isinstance(rep, LowRankFisher):
                for y, om in zip(rep.Y, rep.omega, strict=True):
                    total += float((y * om).sum()) / max(1, y.shape[1])
        return total

    # --- wire: factors ----------------------------------------------------------------------

    def to_arrays(self, dtype: torch.dtype) -> tuple[Arrays, dict[str, Any]]:
        """The factor payloads as named arrays (`<kind>`, 1-D, symmetric parts as triangles) and
        the JSON metadata to rebuild them (kinds, layouts, representation meta)."""
        arrays: Arrays = {}
        rmeta: dict[str, Any] = {}
        for kind, rep in self.reps.items():
            p = rep.to_payload(dtype)
            arrays[kind] = p.data
            rmeta[kind] = dict(p.meta)
        meta = {
            "kinds": self.kinds,
            "layouts": [x.to_json() for x in self.layouts],
            "rep_meta": rmeta,
        }
        return arrays, meta

    @staticmethod
    def from_arrays(arrays: Arrays, meta: dict[str, Any]) -> CurvatureSet:
        """Inverse of `to_arrays` (representations in fp32).

        Raises:
            ValueError: inconsistent metadata or payload sizes.
        """
        layouts = [BlockLayout.from_json(x) for x in meta["layouts"]]
        kinds = [str(k) for k in meta["kinds"]]
        if len(kinds) != len(layouts) or any(k not in KINDS for k in kinds):
            raise ValueError(f"curvature meta: bad kinds {kinds[:5]} for {len(layouts)} blocks")
        cs = CurvatureSet(layouts, kinds)
        present = [k for k in KINDS if k in kinds]
        if sorted(arrays) != sorted(present):
            raise ValueError(f"curvature arrays {sorted(arrays)} do not match kinds {present}")
        cls_of = {"kfac": KFAC, "diag": DiagonalFisher, "lowrank": LowRankFisher}
        for kind in present:
            idx = [i for i, k in enumerate(kinds) if k == kind]
            cs.groups[kind] = idx
            rm = {str(a): int(b) for a, b in meta.get("rep_meta", {}).get(kind, {}).items()}
            payload = Payload(
                kind, tuple(layouts[i].spec for i in idx), arrays[kind].reshape(-1), rm
            )
            cs.reps[kind] = cls_of[kind].from_payload(payload, torch.float32)
        return cs

    # --- wire: inverses ---------------------------------------------------------------------

    def inverse_arrays(self) -> tuple[Arrays, set[str]]:
        """The damped inverses (after `inverse`) as named arrays, and the symmetric names."""
        arrays: Arrays = {}
        sym: set[str] = set()
        for kind, rep in self.reps.items():
            for j, i in enumerate(self.groups[kind]):
                name = f"{kind}/{self.layouts[i].name}"
                if isinstance(rep, KFAC) and rep.a_inv[j] is not None:
                    arrays[f"{name}/A_inv"] = rep.a_inv[j]
                    arrays[f"{name}/G_inv"] = rep.g_inv[j]
                    if rep.a_inv[j].dim() == 2:
                        sym.add(f"{name}/A_inv")
                    sym.add(f"{name}/G_inv")
                elif isinstance(rep, DiagonalFisher) and rep.inv[j] is not None:
                    arrays[f"{name}/inv"] = rep.inv[j]
                elif isinstance(rep, LowRankFisher) and rep.U[j] is not None:
                    arrays[f"{name}/U"] = rep.U[j]
                    arrays[f"{name}/S"] = rep.S[j]
                    arrays[f"{name}/lambda"] = torch.tensor([float(rep.damping[j])])
        return arrays, sym

    def load_inverse_arrays(self, arrays: Arrays) -> None:
        """Installs inverses made by `inverse_arrays` (blocks absent there stay without)."""
        for kind, rep in self.reps.items():
            for j, i in enumerate(self.groups[kind]):
                name = f"{kind}/{self.layouts[i].name}"
                if isinstance(rep, KFAC) and f"{name}/A_inv" in arrays:
                    rep.a_inv[j] = arrays[f"{name}/A_inv"].float().contiguous()
                    rep.g_inv[j] = arrays[f"{name}/G_inv"].float().contiguous()
                elif isinstance(rep, DiagonalFisher) and f"{name}/inv" in arrays:
                    rep.inv[j] = arrays[f"{name}/inv"].float().contiguous()
                elif isinstance(rep, LowRankFisher) and f"{name}/U" in arrays:
                    rep.U[j] = arrays[f"{name}/U"].float().contiguous()
                    rep.S[j] = arrays[f"{name}/S"].float().contiguous()
                    rep.damping[j] = float(arrays[f"{name}/lambda"][0])
