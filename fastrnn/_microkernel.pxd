# The float32 micro-kernel (_microkernel.h) as the kernel modules use it:
# weights packed once per parameter set (pack), products over them
# (packed_product). Compiled into each kernel build; the build's flags pick
# AVX-512, AVX2+FMA or the portable code. aligned_float32 allocates through
# numpy's C API: every module that cimports this file calls cnp.import_array()
# (without it the API's table is NULL and the first call would crash).

cimport numpy as cnp

cdef extern from "_microkernel.h":
    const int FASTRNN_MK_LANES
    const int FASTRNN_MK_MAX_NV
    const char* FASTRNN_MK_ISA
    ctypedef unsigned int fastrnn_mask
    const int FASTRNN_MK_ZERO
    const int FASTRNN_MK_FROM_C
    const int FASTRNN_MK_FROM_ROW
    Py_ssize_t fastrnn_mk_groups(Py_ssize_t units, int ub) noexcept nogil
    Py_ssize_t fastrnn_mk_packed_size(Py_ssize_t K, Py_ssize_t units, int gates,
                                      int ub) noexcept nogil
    void fastrnn_mk_pack(const float* src, Py_ssize_t s_k, Py_ssize_t s_n, Py_ssize_t K,
                         Py_ssize_t units, int gates, int ub, float* out) noexcept nogil
    void fastrnn_mk_pack_rows(const float* src, Py_ssize_t s_k, Py_ssize_t K, Py_ssize_t k0,
                              Py_ssize_t k1, Py_ssize_t units, int ub,
                              float* out) noexcept nogil
    void fastrnn_mk_group_columns(Py_ssize_t q, Py_ssize_t units, int gates, int ub,
                                  Py_ssize_t ld_gate, Py_ssize_t unit0, Py_ssize_t* coff,
                                  fastrnn_mask* mask) noexcept nogil
    void fastrnn_mk_transpose(const float* src, Py_ssize_t ld, Py_ssize_t rows,
                              Py_ssize_t cols, float* dst, float* sums,
                              float* sums2) noexcept nogil
    const int FASTRNN_MK_PEAK_CHAINS
    const Py_ssize_t FASTRNN_MK_STREAM_BYTES
    const Py_ssize_t FASTRNN_PRODUCT_CHUNK_BYTES
    void fastrnn_mk_fma_loop(long long iters, float* sink) noexcept nogil
    void fastrnn_mk_rows_of_group(Py_ssize_t M, int nv, Py_ssize_t K, const float* a,
                                  Py_ssize_t a_rs, Py_ssize_t a_cs, const float* panel,
                                  float* c, Py_ssize_t ldc, const Py_ssize_t* coff,
                                  const fastrnn_mask* mask, int init,
                                  const float* init_row, const float* next_panel,
                                  Py_ssize_t panel_lines) noexcept nogil


cdef struct Packed:
    # a weight matrix packed for the tiles: ``gates`` blocks of ``units``
    # columns (gate g of unit u: column g * units + u), K deep, in groups of
    # ``ub`` unit blocks (nv = ub * gates vectors per tile row)
    const float* panels
    Py_ssize_t K, units, groups
    Py_ssize_t group_stride     # floats from one group's panel to the next
    int gates, ub, nv


cdef inline object aligned_float32(Py_ssize_t size):
    """An uninitialised float32 array of ``size`` values starting on a
    64-byte boundary (a cache line: no vector load of a panel splits one).
    Through numpy's C API (see the top of this file): the Python route (an import, ``ctypes.data``) cost ~3 us, and a small
    training step packs a few arrays (LSTM 16->32, B=1, T=100: ~250 us)."""
    cdef cnp.npy_intp n = size + 16
    cdef cnp.ndarray buffer = cnp.PyArray_EMPTY(1, &n, cnp.NPY_FLOAT32, 0)
    cdef size_t misalign = <size_t>cnp.PyArray_DATA(buffer) % 64
    cdef Py_ssize_t start = <Py_ssize_t>((64 - misalign) % 64 // sizeof(float))
    return buffer[start:start + size]


cdef inline Packed k_block(const Packed* p, Py_ssize_t k0, Py_ssize_t k1) noexcept nogil:
    """The same packed matrix restricted to its rows k0 <= k < k1 (a block
    of the sum: continuing from C's values, the chains stay the same)."""
    cdef Packed b = p[0]
    b.panels = p.panels + k0 * p.nv * FASTRNN_MK_LANES
    b.K = k1 - k0
    return b


cdef inline int unit_blocks_per_group(int gates, Py_ssize_t units) noexcept nogil:
    """Unit blocks per group: at most as many as keep nv = ub * gates <= 4,
    spread evenly over the groups they need (5 blocks: groups of 3, not 4
    and 1), so that a group is not mostly lanes past the matrix: those are
    multiplied too (a tile's cost is its vectors), and 32 columns in 4-vector
    tiles ran at half speed (dx = dG . W_ih of a 32-input layer, 97 against
    192 GFLOP/s at 64 columns)."""
    cdef Py_ssize_t blocks = max(1, (units + FASTRNN_MK_LANES - 1) // FASTRNN_MK_LANES)
    cdef Py_ssize_t most = max(1, FASTRNN_MK_MAX_NV // gates)
    cdef Py_ssize_t groups = (blocks + most - 1) // most
    return <int>((blocks + groups - 1) // groups)


cdef inline int describe_packed(Packed* out, arr, Py_ssize_t K, Py_ssize_t units,
                                int gates) except -1:
    """The descriptor of an array packed for the tiles (_forward.pack_weights,
    or _backward.pack_rows: gates 1) of K rows and ``gates`` blocks of
    ``units`` columns; the caller keeps the array alive. A size that does
    not fit is a bug of the caller: ValueError, never memory misread."""
    cdef const float[::1] view = arr
    out.gates = gates
    out.ub = unit_blocks_per_group(gates, units)
    out.nv = out.ub * gates
    out.K = K
    out.units = units
    out.groups = fastrnn_mk_groups(units, out.ub)
    if view.shape[0] != fastrnn_mk_packed_size(K, units, gates, out.ub):
        raise ValueError("a packed array does not fit the layer's sizes")
    out.panels = &view[0]
    out.group_stride = out.K * out.nv * FASTRNN_MK_LANES
    return 0


cdef inline void packed_product_groups(Py_ssize_t M, const float* a, Py_ssize_t a_rs,
                                       Py_ssize_t a_cs, const Packed* p, Py_ssize_t q_lo,
                                       Py_ssize_t q_hi, Py_ssize_t unit0, float* c,
                                       Py_ssize_t ldc, Py_ssize_t ld_gate, int init,
                                       const float* init_row) noexcept nogil:
    """The columns of groups [q_lo, q_hi) of C rows [0, M) (ldc apart; gate g
    of unit u at column g * ld_gate + u - unit0) = init + A @ B over the
    packed B, A(m, k) = a[m * a_rs + k * a_cs]; init_row is indexed like a
    row of C."""
    cdef Py_ssize_t coff[4]
    cdef fastrnn_mask mask[4]
    cdef Py_ssize_t q
    cdef Py_ssize_t panel_size = p.group_stride
    # panels too big to stay in L2 together: each group's tiles fetch the
    # next group's panel (the last group's, the first's: a recurrent step
    # comes back to it) into L2 while they run. A panel's own floats, not
    # group_stride: a k_block's panels are its K rows of longer ones.
    cdef Py_ssize_t panel_bytes = p.K * p.nv * FASTRNN_MK_LANES * <Py_ssize_t>sizeof(float)
    cdef bint stream = (q_hi - q_lo) * panel_bytes > FASTRNN_MK_STREAM_BYTES
    cdef Py_ssize_t lines = panel_bytes // 64 if stream else 0
    cdef const float* next_panel
    for q in range(q_lo, q_hi):
        fastrnn_mk_group_columns(q, p.units, p.gates, p.ub, ld_gate, unit0, coff, mask)
        next_panel = p.panels + (q + 1 if q + 1 < q_hi else q_lo) * panel_size
        fastrnn_mk_rows_of_group(M, p.nv, p.K, a, a_rs, a_cs, p.panels + q * panel_size,
                                 c, ldc, coff, mask, init, init_row,
                                 next_panel if stream else NULL, lines)


cdef inline void packed_product(Py_ssize_t M, const float* a, Py_ssize_t a_rs,
                                Py_ssize_t a_cs, const Packed* p, float* c, Py_ssize_t ldc,
                                Py_ssize_t ld_gate, int init,
                                const float* init_row) noexcept nogil:
    """All the columns: C rows [0, M) (ldc apart; gate g of unit u at column
    g * ld_gate + u) = init + A @ B over the packed B."""
    packed_product_groups(M, a, a_rs, a_cs, p, 0, p.groups, 0, c, ldc, ld_gate, init,
                          init_row)


cdef inline void packed_product_by_rows(Py_ssize_t M, const float* a, Py_ssize_t a_rs,
                                        Py_ssize_t a_cs, const Packed* p, float* c,
                                        Py_ssize_t ldc, Py_ssize_t ld_gate, int init,
                                        const float* init_row,
                                        Py_ssize_t chunk) noexcept nogil:
    """packed_product in chunks of ``chunk`` rows of C, every column group of
    a chunk before the next chunk: where B's panels fit L2 but A's rows do
    not, a chunk's rows stay in the caches while every panel passes, instead
    of all of A passing again for each group (the weight gradients' sums: A
    a block of dG^T, 2048 rows x 256 for a 512-unit LSTM, in chunks of 48
    rows that stay in L1; the input gradient, in product_chunk_rows' chunks
    that stay in L2). The same chains."""
    cdef Py_ssize_t m0 = 0
    while m0 < M:
        packed_product(min(chunk, M - m0), a + m0 * a_rs, a_rs, a_cs, p, c + m0 * ldc, ldc,
                       ld_gate, init, init_row)
        m0 += chunk


cdef inline Py_ssize_t product_chunk_rows(Py_ssize_t K) noexcept nogil:
    """Rows of A (K floats each) per chunk of a product over many rows
    (FASTRNN_PRODUCT_CHUNK_BYTES, _tuning.h): a multiple of 48 rows, whole
    tiles of AVX-512's 16, 12, 8 and 6 rows and of AVX2's 8, 4 and 3 (its
    5-row tiles leave 3 rows a chunk; chunks change no value)."""
    return max(48, FASTRNN_PRODUCT_CHUNK_BYTES // (max(K, 1) * 4 * 48) * 48)
