"""fedng: Federated Natural Gradient for PyTorch, with native curvature kernels.

Submodules:
    fedng.ops: the native ops (K-FAC factors, damped Cholesky inverses, low-rank Fisher sketches).
    fedng.reference: pure-torch float64 references of every op.
    fedng.curvature: hooks capturing layer inputs/output-grads; K-FAC, diagonal, low-rank Fisher.
    fedng.optim: `NaturalGradient`, a preconditioner for any torch.optim optimizer.
    fedng.federated: federated training (FedNG, baselines, offline tasks, simulator);
        CLI `fedng simulate`.
"""

from __future__ import annotations

from fedng import curvature, ops, optim, reference
from fedng._backend import native as _native
from fedng._backend import num_threads
from fedng.errors import BackendUnavailable, FedngError, NumericalError
from fedng.optim import NaturalGradient

__version__: str = _native.__version__


def show_config() -> str:
    """Describes this build: version, BLAS, CUDA, threads. Returns the text it prints."""
    import torch

    lines = [
        f"fedng {__version__}",
        f"  extension: {_native.__file__}",
        f"  BLAS/LAPACK: scipy-openblas32 ({_native.blas_config().strip()})",
        f"  small-matrix kernels: {_native.small_kernel_isa()}",
        f"  CUDA kernels built: {'yes' if _native.cuda_built else 'no'}",
        f"  threads: {num_threads()} (torch.get_num_threads()); torch {torch.__version__}",
    ]
    text = "\n".join(lines)
    print(text)
    return text


__all__ = [
    "BackendUnavailable",
    "FedngError",
    "NaturalGradient",
    "NumericalError",
    "__version__",
    "curvature",
    "ops",
    "optim",
    "reference",
    "show_config",
]
