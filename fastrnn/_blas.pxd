# The one place that cimports scipy's BLAS. Row-major, fused float32/float64
# wrappers; every other module calls these, never cython_blas directly.
#
# BLAS is column-major and a row-major matrix is its transpose there, so the
# row-major C = op(A) @ op(B) is the column-major C^T = op(B)^T @ op(A)^T:
# gemm(op_b, op_a, n, m, k, alpha, B, ldb, A, lda, beta, C, ldc).
# Dimensions are C int: callers guarantee they fit (checked in Python).

from cython cimport floating
from scipy.linalg.cython_blas cimport sgemm, dgemm, sgemv, dgemv


cdef inline void gemm(bint trans_a, bint trans_b, int m, int n, int k,
                      floating alpha, const floating* a, int lda,
                      const floating* b, int ldb,
                      floating beta, floating* c, int ldc) noexcept nogil:
    """Row-major C (m, n) = alpha * op(A) @ op(B) + beta * C."""
    cdef char ta = b'T' if trans_a else b'N'
    cdef char tb = b'T' if trans_b else b'N'
    if floating is float:
        sgemm(&tb, &ta, &n, &m, &k, &alpha, <float*>b, &ldb,
              <float*>a, &lda, &beta, c, &ldc)
    else:
        dgemm(&tb, &ta, &n, &m, &k, &alpha, <double*>b, &ldb,
              <double*>a, &lda, &beta, c, &ldc)


cdef inline void gemv(bint trans_a, int m, int n, floating alpha,
                      const floating* a, int lda, const floating* x,
                      floating beta, floating* y) noexcept nogil:
    """Row-major y = alpha * op(A) @ x + beta * y, A of shape (m, n), unit strides."""
    # A row-major (m, n) is column-major (n, m): flip the transpose flag.
    cdef char t = b'N' if trans_a else b'T'
    cdef int one = 1
    if floating is float:
        sgemv(&t, &n, &m, &alpha, <float*>a, &lda, <float*>x, &one,
              &beta, y, &one)
    else:
        dgemv(&t, &n, &m, &alpha, <double*>a, &lda, <double*>x, &one,
              &beta, y, &one)


# OpenBLAS runs a gemm on one thread up to GEMM_ONE_THREAD_MNK and a gemv up
# to GEMV_ONE_THREAD_MN (_tuning.h). When the caller cannot hold BLAS at one
# thread (cells), the per-step products are cut into blocks under these
# bounds. When it can (layers), a gemv is one call (small blocks make it
# ~3.5x slower: 34 vs 9.5 us for 768 x 256) and a gemm is cut into the blocks
# OpenBLAS runs fastest (step_block).
from fastrnn._tuning cimport GEMM_ONE_THREAD_MNK, GEMV_ONE_THREAD_MN


cdef inline Py_ssize_t one_thread_block(Py_ssize_t other, Py_ssize_t limit) noexcept nogil:
    """The largest block of one dimension whose product with ``other`` stays
    within ``limit`` (at least 1)."""
    cdef Py_ssize_t block = limit // other if other > 0 else limit
    return block if block > 0 else 1


cdef inline Py_ssize_t step_block(Py_ssize_t B, Py_ssize_t H, Py_ssize_t GH,
                                  bint blas_held) noexcept nogil:
    """Gate columns per BLAS call in a per-step product of h (B, H) with a
    (H, GH) weight. Batch 1 (gemv): all of them when BLAS is held at one
    thread, else single-thread blocks. Batch > 1 (gemm): when held, blocks of
    64-256 columns keeping m * n * k near 1e6, where OpenBLAS runs fastest
    (measured: 3x over one call at H = 256-512;
    b64-h512 LSTM inference went from ~265 to ~170 ms); else single-thread
    blocks. The backward pass uses the same blocks for its reduction."""
    cdef Py_ssize_t block
    if B <= 0 or H <= 0:
        return 1  # nothing to multiply
    if B == 1:
        return GH if blas_held else one_thread_block(H, GEMV_ONE_THREAD_MN)
    if not blas_held:
        return one_thread_block(B * H, GEMM_ONE_THREAD_MNK)
    block = 1000000 // (B * H)
    return min(max(block, 64), 256)
