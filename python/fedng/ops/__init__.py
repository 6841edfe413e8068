"""Public native ops. Each takes torch tensors, validates them, and calls `fedng._C`.

Every op handles a ragged list of matrices in one call (one per layer, any sizes).
"""

from fedng.ops.damped_cholesky_inverse import CholeskyStatus, DampedInverse, damped_cholesky_inverse
from fedng.ops.gaussian_sketch_matrix import gaussian_sketch_matrix
from fedng.ops.kfac_step import KfacStep, kfac_step
from fedng.ops.kron_accumulate import kron_accumulate
from fedng.ops.kron_precondition import kron_precondition
from fedng.ops.lowrank_precondition import lowrank_precondition
from fedng.ops.nystrom import NystromApprox, nystrom
from fedng.ops.sketch_accumulate import sketch_accumulate

__all__ = [
    "CholeskyStatus",
    "DampedInverse",
    "KfacStep",
    "NystromApprox",
    "damped_cholesky_inverse",
    "gaussian_sketch_matrix",
    "kfac_step",
    "kron_accumulate",
    "kron_precondition",
    "lowrank_precondition",
    "nystrom",
    "sketch_accumulate",
]
