"""Type stub of the native extension `fedng._C` (csrc/bindings.cpp).

Raw addresses (`int`, from `Tensor.data_ptr()`) and sizes in, nothing torch-specific. Every op
takes keyword arguments only, in the one order of csrc/include/fedng/ops.h: `dtype`, buffers
only read, buffers written, sizes, parameters, per-matrix reports (`status` then
`<parameter>_used`), `nthreads`. Inputs are validated by `fedng.ops` first; the extension
re-checks only what would corrupt memory (ValueError). tests/test_native_boundary.py checks
that this stub and the built module agree.
"""

from collections.abc import Sequence

__version__: str
cuda_built: bool
dtype_codes: dict[str, int]
"""`{"float32": 0, "float64": 1}`: the `dtype` argument of every op."""
status_codes: dict[str, int]
"""`{"OK": 0, "JITTER": 1, "FAILED": 2}`: the int8 `status` reports (`CholeskyStatus`)."""

def blas_config() -> str:
    """OpenBLAS build configuration string."""

def blas_num_threads() -> int:
    """Threads OpenBLAS is set to use."""

def small_kernel_isa() -> str:
    """Instruction set of the small-matrix kernels chosen for this CPU."""

def set_avx512_lanes(on: bool) -> bool:
    """Lets the lane kernels use AVX-512 (if the CPU has it); returns the previous setting."""

def gaussian_isa() -> str:
    """Build of the Gaussian sketch rows in use: 'baseline', 'avx2' or 'avx512'."""

def set_gaussian_isa(isa: str) -> str:
    """Switches the Gaussian sketch rows' build (same bits); returns the previous."""

def kron_accumulate(
    *,
    dtype: int,
    inputs: Sequence[int],
    factors: Sequence[int],
    n: Sequence[int],
    k: Sequence[int],
    decay: float,
    scale: Sequence[float],
    nthreads: int,
) -> None:
    """`factors[i] <- decay factors[i] + scale[i] inputs[i]^T inputs[i]`, in place.

    factors[i] is [n_i, n_i], inputs[i] is [k_i, n_i].
    """

def damped_cholesky_inverse(
    *,
    dtype: int,
    mats: Sequence[int],
    outs: Sequence[int],
    n: Sequence[int],
    damping: Sequence[float],
    max_tries: int,
    jitter_factor: float,
    status: int,
    damping_used: int,
    nthreads: int,
) -> None:
    """`outs[i] <- (mats[i] + damping[i] I)^-1`, all [n_i, n_i].

    `status` is the address of an int8 [N] buffer, `damping_used` of a float64 [N] buffer.
    """

def kron_precondition(
    *,
    dtype: int,
    grads: Sequence[int],
    a_inv: Sequence[int],
    g_inv: Sequence[int],
    inputs: Sequence[int],
    output_grads: Sequence[int],
    outs: Sequence[int],
    m: Sequence[int],
    n: Sequence[int],
    batch: Sequence[int],
    nthreads: int,
) -> None:
    """`outs[i] [m_i, n_i] <- g_inv[i] grads[i] a_inv[i]`.

    `batch[i] >= 0` gives the rows B_i of inputs[i] [B_i, n_i] and output_grads[i] [B_i, m_i],
    used instead of grads[i] (address 0) when cheaper; `batch[i] = -1` when there are none.
    """

def sketch_accumulate(
    *,
    dtype: int,
    jacobians: Sequence[int],
    omegas: Sequence[int],
    sketches: Sequence[int],
    d: Sequence[int],
    r: Sequence[int],
    b: Sequence[int],
    decay: float,
    scale: Sequence[float],
    nthreads: int,
) -> None:
    """`sketches[i] <- decay sketches[i] + scale[i] J^T (J omegas[i])`, J = jacobians[i].

    sketches[i] and omegas[i] are [d_i, r_i], jacobians[i] is [b_i, d_i].
    """

def nystrom(
    *,
    dtype: int,
    sketches: Sequence[int],
    omegas: Sequence[int],
    U: Sequence[int],
    S: Sequence[int],
    d: Sequence[int],
    r: Sequence[int],
    shift: Sequence[float],
    status: int,
    shift_used: int,
    nthreads: int,
) -> None:
    """`U[i]` [d_i, r_i], `S[i]` [r_i] <- stable Nystrom of `sketches[i]` [d_i, r_i].

    `shift[i] < 0` means automatic. `status` is the address of an int8 [N] buffer, `shift_used`
    of a float64 [N] buffer.
    """

def lowrank_precondition(
    *,
    dtype: int,
    U: Sequence[int],
    S: Sequence[int],
    V: Sequence[int],
    outs: Sequence[int],
    d: Sequence[int],
    r: Sequence[int],
    c: Sequence[int],
    damping: Sequence[float],
    nthreads: int,
) -> None:
    """`outs[i] <- (U[i] diag(S[i]) U[i]^T + damping[i] I)^-1 V[i]`.

    U[i] is [d_i, r_i], S[i] is [r_i], V[i] and outs[i] are [d_i, c_i].
    """

def gaussian_sketch_matrix(
    *,
    dtype: int,
    out: int,
    d: int,
    r: int,
    seed: int,
    stream_id: int,
    nthreads: int,
) -> None:
    """`out` [d, r] <- the Philox Gaussian matrix of `(seed, stream_id)`."""

def bf16_axpy(*, xs: Sequence[int], accs: Sequence[int], n: Sequence[int], weight: float) -> None:
    """`accs[k] [n[k]] float32 += weight * xs[k] [n[k]] bfloat16`."""

def int8_payload_axpy(
    *,
    q: int,
    side: int,
    acc: int,
    nq: int,
    nside: int,
    nacc: int,
    segs: Sequence[int],
    chunk: int,
    weight: float,
) -> None:
    """`acc` float32 [nacc] += `weight * dequantize(q, side)`, segment by segment: `segs` holds
    flattened `(form, at, qat, sat, n, k)` sextuples (form 0 a triangle, 1 a vector of `chunk`
    entries per scale, 2 a low-rank `B~ B~^T + sigma I`; offsets in `acc`, `q` int8 [nq] and
    `side` float32 [nside]; `fedng.curvature.quantize`)."""

def int8_payload_traces(
    *, q: int, side: int, nq: int, nside: int, segs: Sequence[int], chunk: int
) -> list[float]:
    """Per segment of `segs` (as in `int8_payload_axpy`), the trace of its dequantized matrix from
    its scales (and a low-rank factor's digits); `[]` when a segment is a vector or a scale is
    negative or not finite."""

def unpack_triangle(*, dtype: int, vec: int, out: int, n: int) -> None:
    """`out` [n, n] (float32 / float64 by `dtype`) <- the symmetric matrix whose packed lower
    triangle, row by row, is `vec` [n (n + 1) / 2]; every entry a copy."""

def int8_quantize_vector(*, x: int, q: int, scale: int, n: int, chunk: int) -> None:
    """Float32 `x` [n] as int8 `q` [n] and float32 `scale` [ceil(n / chunk)]: per chunk
    `float(max |x| / 127)` and `round(x / scale)` clamped to +-127 in float64 (scale <= 0 or
    NaN: 1; NaN values: 0)."""

def fold_update(
    *,
    xs: Sequence[int],
    accs: Sequence[int],
    n: Sequence[int],
    bf16: Sequence[int],
    weight: float,
    q: int,
    side: int,
    acc: int,
    nq: int,
    nside: int,
    nacc: int,
    segs: Sequence[int],
    chunk: int,
) -> None:
    """`accs[k] += weight * xs[k]` ([n[k]], float32 or bfloat16 where `bf16[k]`), then (`segs`
    not empty) `int8_payload_axpy` of the int8 payload `q`, `side` into `acc`."""

def dots_f64(*, xs: Sequence[int], ys: Sequence[int], n: Sequence[int]) -> list[float]:
    """Per pair of float32 arrays `xs[k]`, `ys[k]` [n[k]], `<xs[k], ys[k]>` with products and
    sums in float64."""

def int8_quantize_triangles(
    *, vals: int, q: int, side: int, nvals: int, nside: int, tris: Sequence[int]
) -> None:
    """`q` int8 [nvals], `side` float32 [nside] <- the int8 quantization of the packed triangles
    `tris` (flattened `(at, sat, n)` triples) of `vals` float32 [nvals], each with its diagonal
    and a certified bound on its rounding error's spectral norm (`fedng.curvature.quantize`)."""

def check_fold(
    *,
    xs: Sequence[int],
    accs: Sequence[int],
    n: Sequence[int],
    bf16: Sequence[int],
    weight: float,
    bound: float,
    first: bool,
) -> tuple[bool, list[float]]:
    """A plain update's squared norms per array (`sum_squares`); when all are finite and the
    square root of their `exact_sum` is at most `bound`, `accs[k] = weight * xs[k]` (first) or
    `accs[k] + weight * xs[k]` (the product rounded to float32 first) and True; else False and
    nothing written."""

def summable_check_fold(
    *,
    xs: Sequence[int],
    accs: Sequence[int],
    n: Sequence[int],
    bf16: Sequence[int],
    ndelta: int,
    q: int,
    side: int,
    acc: int,
    nq: int,
    nside: int,
    nacc: int,
    segs: Sequence[int],
    chunk: int,
    max_abs: float,
    pairs: Sequence[int],
    divs: Sequence[float],
    bounds: Sequence[float],
    weight: float,
    norm_bound: float,
) -> tuple[int, float, list[float], list[float]]:
    """(status, delta norm, squared norms, curvature scales) of a summable reply
    (csrc/include/fedng/summable_fold.h): the arrays' squared norms (`sum_squares`; status 1 if
    one is not finite), the int8 payload's traces (`int8_payload_traces`; 2 if unsettled or
    above `max_abs`), the norm of the first `ndelta` arrays (`exact_sum`; 3 if not finite or
    above `norm_bound`), the curvature scales `traces[a] [* traces[b]] / div` per `pairs` (4 if
    one is not finite or above its bound, NaN: none), then `fold_update` with `weight` (0).
    Only 0 writes anything; the norm and the scales are set once measured."""

def exact_sum(*, x: Sequence[float]) -> float:
    """The correctly rounded sum of finite doubles (`math.fsum`)."""

def sum_squares(*, xs: Sequence[int], n: Sequence[int], bf16: Sequence[int]) -> list[float]:
    """Per array `xs[i]` [n[i]] (float32, or bfloat16 where `bf16[i]` is not 0), the sum of its
    squared entries (blocks of 1024 in float32, redone in float64 when that is not finite, added
    in float64): NaN/Inf iff an entry is."""

def kfac_step(
    *,
    dtype: int,
    inputs: Sequence[int],
    output_grads: Sequence[int],
    grads: Sequence[int],
    a_inv: Sequence[int],
    g_inv: Sequence[int],
    probe_u: Sequence[int],
    probe_v: Sequence[int],
    a_factors: Sequence[int],
    g_factors: Sequence[int],
    outs: Sequence[int],
    m: Sequence[int],
    n: Sequence[int],
    rows: Sequence[int],
    bias: Sequence[int],
    decay: Sequence[float],
    a_scale: Sequence[float],
    g_scale: Sequence[float],
    update_factors: int,
    precondition: int,
    check_finite: int,
    form: int,
    sums: int,
    nthreads: int,
) -> None:
    """Fused K-FAC step of Linear layers (see `fedng.ops.kfac_step`).

    Per layer: `A <- decay A + a_scale [x 1]^T [x 1]`, `G <- decay G + g_scale g^T g` (if
    `update_factors`; 2: the lower triangles only, the upper ones left as they were), then
    `outs[i] <- g_inv grads[i] a_inv` (if `precondition`), by the batch or the dense form; `form`
    is the address of an int8 [N] buffer (0/1/2), `sums` of a float64 [2N] buffer: each
    gradient's sum (with `check_finite`, checked before any update: a non-finite one stops the
    call) and each `<outs[i], grads[i]>` (NaN where not preconditioned).
    """

def trust_dots(
    *,
    params: Sequence[int],
    theta: Sequence[int],
    g_old: Sequence[int],
    grads: Sequence[int],
    n: Sequence[int],
) -> list[float]:
    """The trust region's sums over float32 arrays, products and sums in float64:
    `[<g_old, params - theta>, <grads, params - theta>, <grads, grads>]`."""
