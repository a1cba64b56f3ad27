/* fastrnn's own float32 micro-kernel: register-blocked tiles over weights
 * packed once.
 *
 * Every product of the recurrent engine is C[m, n] = init + sum_k A[m, k] *
 * B[k, n], with B a weight matrix packed when the parameters change, and A
 * the step's state rows (or inputs, or gradients), read in place with any
 * row and column stride. A tile holds MR rows x NV vectors of C in registers
 * over the whole k loop: per k, NV vector loads of the packed panel, and per
 * row one broadcast and NV fused multiply-adds.
 *
 * Determinism: every element of C is one chain, init then k = 0, 1, ... K-1
 * in order, whatever the tile size, the tile's position, the batch or the
 * thread that computes it. So a row's results never depend on the rows
 * computed with it or on how the work is split. The AVX-512 and AVX2 builds
 * run the same chains with the same fused multiply-add, so they agree bit
 * for bit; the portable build rounds a * b + c in two steps on x86-64 (no
 * FMA on its baseline; GCC on AArch64 fuses them) and agrees to rounding.
 * Within any one build a row's chains stay the same however it is run.
 *
 * Packed layout. The columns of B come in groups; a group is NV vectors of
 * W lanes (W = FASTRNN_MK_LANES: 16 AVX-512, 8 otherwise; NV at most 4, as
 * many blocks of W units as the columns fill evenly: unit_blocks_per_group
 * in _microkernel.pxd). Its panel holds,
 * for each k, the NV vectors one after the other: panel[(k * NV + v) * W +
 * lane]. Where the group's vectors land in a row of C is the caller's
 * business (``coff``: a column offset per vector), and so is which lanes are
 * real (``mask``: a bit per lane; lanes past the matrix are packed as zeros
 * and never stored). For the gates of a unit block the vectors are the
 * gates' blocks of the same W units, so one tile yields every gate of those
 * units and the gate pass can run on them while they are in L1.
 *
 * This header is compiled into each kernel build (fastrnn/_forward*.pyx,
 * _backward*.pyx); the build's flags choose the instruction set.
 */
#ifndef FASTRNN_MICROKERNEL_H
#define FASTRNN_MICROKERNEL_H

#include <stddef.h>
#include <string.h>

#include "_tuning.h"   /* FASTRNN_MK_PREFETCH_BYTES, FASTRNN_MK_PREFETCH_K */
#include "_portable.h" /* FASTRNN_HOLD */

/* MSVC's /arch:AVX2 allows FMA but defines no __FMA__; it has __forceinline
 * for always_inline and no unroll pragma (it unrolls by itself). The AVX
 * macros are only ever defined on x86-64 (setup.py): on any other CPU this
 * is the portable build, without <immintrin.h>. */
#if defined(__AVX2__) && (defined(__FMA__) || (defined(_MSC_VER) && !defined(__clang__)))
#define FASTRNN_MK_AVX2_FMA 1
#endif
#if defined(_MSC_VER) && !defined(__clang__)
#define FASTRNN_ALWAYS_INLINE static __forceinline
#define FASTRNN_UNROLL(n)
#else
#define FASTRNN_ALWAYS_INLINE static inline __attribute__((always_inline))
#define FASTRNN_PRAGMA(x) _Pragma(#x)
#define FASTRNN_UNROLL(n) FASTRNN_PRAGMA(GCC unroll n)
#endif

#if defined(__AVX512F__)
#include <immintrin.h>
#define FASTRNN_MK_LANES 16
#define FASTRNN_MK_ISA "avx512"
#elif defined(FASTRNN_MK_AVX2_FMA)
#include <immintrin.h>
#define FASTRNN_MK_LANES 8
#define FASTRNN_MK_ISA "avx2"
#else
#define FASTRNN_MK_LANES 8
#define FASTRNN_MK_ISA "portable"
#endif

/* vectors per tile row and rows per tile: MR x NV accumulators, the panel
 * vectors held (FASTRNN_MK_HELD) and a broadcast fit the vector registers
 * (32 zmm; 16 ymm) */
#define FASTRNN_MK_MAX_NV 4
#if defined(__AVX512F__)
static const int fastrnn_mk_rows[FASTRNN_MK_MAX_NV + 1] = {0, 16, 12, 8, 6};
#elif defined(FASTRNN_MK_AVX2_FMA)
static const int fastrnn_mk_rows[FASTRNN_MK_MAX_NV + 1] = {0, 8, 5, 4, 3};
#else
static const int fastrnn_mk_rows[FASTRNN_MK_MAX_NV + 1] = {0, 4, 4, 4, 4};
#endif

typedef unsigned int fastrnn_mask;          /* a bit per lane */
/* the lanes below n (0 <= n <= FASTRNN_MK_LANES) */
#define FASTRNN_MK_FIRST(n) ((fastrnn_mask)((1u << (n)) - 1u))
#define FASTRNN_MK_FULL FASTRNN_MK_FIRST(FASTRNN_MK_LANES)

/* init: where the accumulators start */
enum { FASTRNN_MK_ZERO = 0,     /* 0 */
       FASTRNN_MK_FROM_C = 1,   /* C's current values (accumulate into C) */
       FASTRNN_MK_FROM_ROW = 2  /* one row, ``init_row`` (+ coff), for every m: a bias */
};

/* Panel vectors of a step of k held in registers for all the tile's rows:
 * all NV, unless the accumulators, the NV vectors and a broadcast would
 * pass AVX2's 16 registers; then the last vectors are read by each row's
 * multiply-add from L1 (its memory operand). AVX2's 3 x 4 tile (12
 * accumulators, 3 vectors held, the 4th read) carries 12 independent
 * chains through the multiply-adds' latency where a 2 x 4 tile had 8, and
 * brings a third of a float of panel per multiply-add from L2 where that
 * brought a half (the panels of an H = 512 LSTM's W_hh pass L1; the 4th
 * vector's second and third reads hit L1); GRU's 4 x 3 tile holds
 * all 3 (16 registers). product_gflops on an AMD EPYC (Zen 3, 32 KB L1d,
 * 512 KB L2; one thread, the 2 x 4 / 3 x 3 build and this one interleaved
 * in one process, medians of 6; 2026-12-07): LSTM M = 64, K = 512 82.0 ->
 * 91.7 GFLOP/s, M = 8, K = 256 74.0 -> 84.6, M = 32, K = 128 84.8 -> 87.1;
 * GRU M = 20, K = 800 85.4 -> 94.2, M = 10 74.9 -> 86.6, M = 32, K = 128
 * 80.4 -> 88.4; M = 1 unchanged (the same one-row tile). The calls, at 1
 * thread, b32-h128 1.04x, stack2-b32 1.07x, wide-b500 1.10x; at 2 threads
 * b256-h64 1.09x, b64-h512 1.06x, ds2-b20 1.25x. */
#if defined(FASTRNN_MK_AVX2_FMA) && !defined(__AVX512F__)
#define FASTRNN_MK_HELD(MR, NV)                                               \
    ((MR) * (NV) + (NV) + 1 <= 16 ? (NV) : (MR) * (NV) < 15 ? 15 - (MR) * (NV) : 0)
#else
#define FASTRNN_MK_HELD(MR, NV) (NV)
#endif

/* FASTRNN_VHOLD(v): the panel vector v held in a register for the step's
 * rows (_portable.h: FASTRNN_HOLD). Left to itself GCC folded the panel
 * loads of the 2- and 3-row tiles into their multiply-adds, a load per row
 * (as it did in the int8 tiles), and those tiles took longer than a 4- or
 * 6-row one (product_gflops, K = 128, 4 x 128 units, one thread: 2 rows 4.8
 * us, 3 rows 6.9, 4 rows 3.5, 6 rows 5.1). */

/* ------------------------------------------------------------------------ */
#if defined(__AVX512F__)

typedef __m512 fastrnn_vec;
FASTRNN_ALWAYS_INLINE fastrnn_vec fastrnn_mk_load(
        const float* p, fastrnn_mask m) {
    return m == FASTRNN_MK_FULL ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps((__mmask16)m, p);
}
FASTRNN_ALWAYS_INLINE void fastrnn_mk_store(
        float* p, fastrnn_vec v, fastrnn_mask m) {
    if (m == FASTRNN_MK_FULL) _mm512_storeu_ps(p, v);
    else _mm512_mask_storeu_ps(p, (__mmask16)m, v);
}
#define FASTRNN_VZERO() _mm512_setzero_ps()
#define FASTRNN_VLOAD_PANEL(p) _mm512_loadu_ps(p)
#define FASTRNN_VHOLD(v) FASTRNN_HOLD(v)
#define FASTRNN_VBCAST(x) _mm512_set1_ps(x)
#define FASTRNN_VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define FASTRNN_VADD(a, b) _mm512_add_ps(a, b)
#define FASTRNN_VUNPACKLO(a, b) _mm512_unpacklo_ps(a, b)
#define FASTRNN_VUNPACKHI(a, b) _mm512_unpackhi_ps(a, b)
#define FASTRNN_VSHUFFLE(a, b, imm) _mm512_shuffle_ps(a, b, imm)
#define FASTRNN_PREFETCH(p) _mm_prefetch((const char*)(p), _MM_HINT_T0)
#define FASTRNN_PREFETCH_L2(p) _mm_prefetch((const char*)(p), _MM_HINT_T1)

#elif defined(FASTRNN_MK_AVX2_FMA)

typedef __m256 fastrnn_vec;
FASTRNN_ALWAYS_INLINE __m256i fastrnn_mk_lanes(fastrnn_mask m) {
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    __m256i bits = _mm256_and_si256(_mm256_set1_epi32((int)m), bit);
    return _mm256_cmpeq_epi32(bits, bit);
}
FASTRNN_ALWAYS_INLINE fastrnn_vec fastrnn_mk_load(
        const float* p, fastrnn_mask m) {
    return m == FASTRNN_MK_FULL ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, fastrnn_mk_lanes(m));
}
FASTRNN_ALWAYS_INLINE void fastrnn_mk_store(
        float* p, fastrnn_vec v, fastrnn_mask m) {
    if (m == FASTRNN_MK_FULL) _mm256_storeu_ps(p, v);
    else _mm256_maskstore_ps(p, fastrnn_mk_lanes(m), v);
}
#define FASTRNN_VZERO() _mm256_setzero_ps()
#define FASTRNN_VLOAD_PANEL(p) _mm256_loadu_ps(p)
#define FASTRNN_VHOLD(v) FASTRNN_HOLD(v)
#define FASTRNN_VBCAST(x) _mm256_set1_ps(x)
#define FASTRNN_VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define FASTRNN_VADD(a, b) _mm256_add_ps(a, b)
#define FASTRNN_VUNPACKLO(a, b) _mm256_unpacklo_ps(a, b)
#define FASTRNN_VUNPACKHI(a, b) _mm256_unpackhi_ps(a, b)
#define FASTRNN_VSHUFFLE(a, b, imm) _mm256_shuffle_ps(a, b, imm)
#define FASTRNN_PREFETCH(p) _mm_prefetch((const char*)(p), _MM_HINT_T0)
#define FASTRNN_PREFETCH_L2(p) _mm_prefetch((const char*)(p), _MM_HINT_T1)

#else  /* portable: plain arrays the compiler may vectorise; a * b + c rounded twice */

typedef struct { float x[FASTRNN_MK_LANES]; } fastrnn_vec;
static inline fastrnn_vec fastrnn_mk_load(const float* p, fastrnn_mask m) {
    fastrnn_vec v;
    for (int l = 0; l < FASTRNN_MK_LANES; l++) v.x[l] = (m >> l) & 1u ? p[l] : 0.0f;
    return v;
}
static inline void fastrnn_mk_store(float* p, fastrnn_vec v, fastrnn_mask m) {
    for (int l = 0; l < FASTRNN_MK_LANES; l++) if ((m >> l) & 1u) p[l] = v.x[l];
}
static inline fastrnn_vec fastrnn_vzero(void) {
    fastrnn_vec v;
    for (int l = 0; l < FASTRNN_MK_LANES; l++) v.x[l] = 0.0f;
    return v;
}
static inline fastrnn_vec fastrnn_vload_panel(const float* p) {
    fastrnn_vec v;
    memcpy(v.x, p, sizeof v.x);
    return v;
}
static inline fastrnn_vec fastrnn_vbcast(float x) {
    fastrnn_vec v;
    for (int l = 0; l < FASTRNN_MK_LANES; l++) v.x[l] = x;
    return v;
}
static inline fastrnn_vec fastrnn_vmuladd(fastrnn_vec a, fastrnn_vec b, fastrnn_vec c) {
    for (int l = 0; l < FASTRNN_MK_LANES; l++) {
        float prod = a.x[l] * b.x[l];   /* two roundings on x86-64 (no FMA there); GCC
                                            on AArch64 contracts it into one FMA */
        c.x[l] = c.x[l] + prod;
    }
    return c;
}
#define FASTRNN_VZERO() fastrnn_vzero()
#define FASTRNN_VLOAD_PANEL(p) fastrnn_vload_panel(p)
#define FASTRNN_VHOLD(v) ((void)0)
#define FASTRNN_VBCAST(x) fastrnn_vbcast(x)
#define FASTRNN_VFMA(a, b, c) fastrnn_vmuladd(a, b, c)
#define FASTRNN_PREFETCH(p) ((void)(p))
#define FASTRNN_PREFETCH_L2(p) ((void)(p))

#endif

/* The last n < FASTRNN_MK_LANES values of a float32 row in and out of one
 * vector's scratch (fastrnn/_gates.pxd.tp: the rows' tails): in, the n
 * values and zeros; out, the first n lanes. The masked loads and stores
 * touch no memory past the n values and cost a few instructions, where a
 * memcpy call of a variable length cost tens of cycles (eleven of them
 * made an LSTM row's tail ~200 cycles). Tails shorter than
 * FASTRNN_MK_TAIL_MIN stay in the loops' scalar code, cheaper than copies. */
#define FASTRNN_MK_TAIL_MIN 3
static inline void fastrnn_mk_tail_in(float* dst, const float* src, ptrdiff_t n) {
    fastrnn_mk_store(dst, fastrnn_mk_load(src, FASTRNN_MK_FIRST(n)), FASTRNN_MK_FULL);
}
static inline void fastrnn_mk_tail_out(float* dst, const float* src, ptrdiff_t n) {
    fastrnn_mk_store(dst, fastrnn_mk_load(src, FASTRNN_MK_FULL), FASTRNN_MK_FIRST(n));
}

/* 64-byte cache lines of one k's NV vectors in a panel */
#define FASTRNN_MK_PANEL_LINES(NV) (((NV) * FASTRNN_MK_LANES * 4 + 63) / 64)

/* One step of k of a tile: NV panel vectors, MR broadcasts, MR x NV
 * multiply-adds; PF_CUR fetches this panel FASTRNN_MK_PREFETCH_K steps
 * ahead into L1, PF_NEXT one line of the next panel into L2 (both
 * compile-time constants, so the loops below carry no tests). */
#define FASTRNN_MK_STEP(MR, NV, PF_CUR, PF_NEXT)                                       \
    {                                                                                \
        enum { mk_held = FASTRNN_MK_HELD(MR, NV) };                                  \
        fastrnn_vec w[NV];                                                           \
        const float* a_k = a + k * a_cs;                                             \
        const float* p_k = panel + k * NV * FASTRNN_MK_LANES;                        \
        FASTRNN_UNROLL(4) for (int v = 0; v < mk_held; v++) {                        \
            w[v] = FASTRNN_VLOAD_PANEL(p_k + v * FASTRNN_MK_LANES);                  \
            FASTRNN_VHOLD(w[v]);                                                     \
        }                                                                            \
        FASTRNN_UNROLL(16) for (int m = 0; m < MR; m++) {                            \
            fastrnn_vec h = FASTRNN_VBCAST(a_k[m * a_rs]);                           \
            FASTRNN_UNROLL(4) for (int v = 0; v < mk_held; v++)                      \
                acc[m][v] = FASTRNN_VFMA(h, w[v], acc[m][v]);                        \
            FASTRNN_UNROLL(4) for (int v = mk_held; v < NV; v++)                     \
                acc[m][v] = FASTRNN_VFMA(                                            \
                    h, FASTRNN_VLOAD_PANEL(p_k + v * FASTRNN_MK_LANES), acc[m][v]);  \
        }                                                                            \
        if (PF_CUR) {                                                                \
            const float* ahead = panel + (k + FASTRNN_MK_PREFETCH_K) * NV            \
                                 * FASTRNN_MK_LANES;                                 \
            FASTRNN_UNROLL(4) for (int l = 0; l < FASTRNN_MK_PANEL_LINES(NV); l++)   \
                FASTRNN_PREFETCH(ahead + l * 16);                                    \
        }                                                                            \
        if (PF_NEXT) FASTRNN_PREFETCH_L2(next + k * 16);                             \
    }

/* One tile of MR rows x NV vectors (both compile-time constants). next:
 * where this tile fetches its share of the next panel into L2, a line per
 * step of k for its first next_lines steps (NULL: none; see
 * fastrnn_mk_rows_of_group), as long as it fetches its own panel ahead
 * (not in its last FASTRNN_MK_PREFETCH_K steps; a tile that never does, one
 * row or a panel that fits L1, fetches none of the next). */
#define FASTRNN_MK_TILE(MR, NV)                                                        \
static void fastrnn_mk_tile_##MR##_##NV(                                             \
        ptrdiff_t K, const float* a, ptrdiff_t a_rs, ptrdiff_t a_cs,                 \
        const float* panel, float* c, ptrdiff_t ldc, const ptrdiff_t* coff,          \
        const fastrnn_mask* mask, int init, const float* init_row,                   \
        const float* next, ptrdiff_t next_lines) {                                   \
    fastrnn_vec acc[MR][NV];                                                         \
    FASTRNN_UNROLL(16) for (int m = 0; m < MR; m++) {                                \
        FASTRNN_UNROLL(4) for (int v = 0; v < NV; v++) {                             \
            if (init == FASTRNN_MK_FROM_C)                                           \
                acc[m][v] = fastrnn_mk_load(c + m * ldc + coff[v], mask[v]);         \
            else if (init == FASTRNN_MK_FROM_ROW)                                    \
                acc[m][v] = fastrnn_mk_load(init_row + coff[v], mask[v]);            \
            else                                                                     \
                acc[m][v] = FASTRNN_VZERO();                                         \
        }                                                                            \
    }                                                                                \
    /* a panel too big for L1 streams from L2: fetch it ahead (see _tuning.h; */    \
    /* not in a one-row tile); the steps in three runs by their prefetches */       \
    ptrdiff_t cur_end = MR > 1 && K > FASTRNN_MK_PREFETCH_K                          \
                        && K * NV * FASTRNN_MK_LANES * (ptrdiff_t)sizeof(float)      \
                           > FASTRNN_MK_PREFETCH_BYTES                               \
                        ? K - FASTRNN_MK_PREFETCH_K : 0;                             \
    ptrdiff_t both_end = next == NULL ? 0 : next_lines < cur_end ? next_lines : cur_end; \
    ptrdiff_t k = 0;                                                                 \
    for (; k < both_end; k++) FASTRNN_MK_STEP(MR, NV, 1, 1)                          \
    for (; k < cur_end; k++) FASTRNN_MK_STEP(MR, NV, 1, 0)                           \
    for (; k < K; k++) FASTRNN_MK_STEP(MR, NV, 0, 0)                                 \
    FASTRNN_UNROLL(16) for (int m = 0; m < MR; m++)                                  \
        FASTRNN_UNROLL(4) for (int v = 0; v < NV; v++)                               \
            fastrnn_mk_store(c + m * ldc + coff[v], acc[m][v], mask[v]);             \
}

/* every row count up to the largest tile of each vector count, so that the
 * rows left over after whole tiles run the same chains */
#define FASTRNN_MK_TILES_1_TO_4(NV) \
    FASTRNN_MK_TILE(1, NV) FASTRNN_MK_TILE(2, NV) FASTRNN_MK_TILE(3, NV) FASTRNN_MK_TILE(4, NV)
FASTRNN_MK_TILES_1_TO_4(1) FASTRNN_MK_TILES_1_TO_4(2) FASTRNN_MK_TILES_1_TO_4(3)
FASTRNN_MK_TILES_1_TO_4(4)
#if defined(__AVX512F__) || defined(FASTRNN_MK_AVX2_FMA)
FASTRNN_MK_TILE(5, 1) FASTRNN_MK_TILE(6, 1) FASTRNN_MK_TILE(7, 1) FASTRNN_MK_TILE(8, 1)
FASTRNN_MK_TILE(5, 2)
#endif
#if defined(__AVX512F__)
FASTRNN_MK_TILE(9, 1) FASTRNN_MK_TILE(10, 1) FASTRNN_MK_TILE(11, 1) FASTRNN_MK_TILE(12, 1)
FASTRNN_MK_TILE(13, 1) FASTRNN_MK_TILE(14, 1) FASTRNN_MK_TILE(15, 1) FASTRNN_MK_TILE(16, 1)
FASTRNN_MK_TILE(6, 2) FASTRNN_MK_TILE(7, 2) FASTRNN_MK_TILE(8, 2) FASTRNN_MK_TILE(9, 2)
FASTRNN_MK_TILE(10, 2) FASTRNN_MK_TILE(11, 2) FASTRNN_MK_TILE(12, 2)
FASTRNN_MK_TILE(5, 3) FASTRNN_MK_TILE(6, 3) FASTRNN_MK_TILE(7, 3) FASTRNN_MK_TILE(8, 3)
FASTRNN_MK_TILE(5, 4) FASTRNN_MK_TILE(6, 4)
#endif

typedef void (*fastrnn_mk_tile_fn)(ptrdiff_t, const float*, ptrdiff_t, ptrdiff_t,
                                   const float*, float*, ptrdiff_t, const ptrdiff_t*,
                                   const fastrnn_mask*, int, const float*,
                                   const float*, ptrdiff_t);

#define FASTRNN_MK_ENTRY(MR, NV) fastrnn_mk_tile_##MR##_##NV
static const fastrnn_mk_tile_fn fastrnn_mk_table[FASTRNN_MK_MAX_NV][16] = {
#if defined(__AVX512F__)
    {FASTRNN_MK_ENTRY(1, 1), FASTRNN_MK_ENTRY(2, 1), FASTRNN_MK_ENTRY(3, 1), FASTRNN_MK_ENTRY(4, 1),
     FASTRNN_MK_ENTRY(5, 1), FASTRNN_MK_ENTRY(6, 1), FASTRNN_MK_ENTRY(7, 1), FASTRNN_MK_ENTRY(8, 1),
     FASTRNN_MK_ENTRY(9, 1), FASTRNN_MK_ENTRY(10, 1), FASTRNN_MK_ENTRY(11, 1),
     FASTRNN_MK_ENTRY(12, 1), FASTRNN_MK_ENTRY(13, 1), FASTRNN_MK_ENTRY(14, 1),
     FASTRNN_MK_ENTRY(15, 1), FASTRNN_MK_ENTRY(16, 1)},
    {FASTRNN_MK_ENTRY(1, 2), FASTRNN_MK_ENTRY(2, 2), FASTRNN_MK_ENTRY(3, 2), FASTRNN_MK_ENTRY(4, 2),
     FASTRNN_MK_ENTRY(5, 2), FASTRNN_MK_ENTRY(6, 2), FASTRNN_MK_ENTRY(7, 2), FASTRNN_MK_ENTRY(8, 2),
     FASTRNN_MK_ENTRY(9, 2), FASTRNN_MK_ENTRY(10, 2), FASTRNN_MK_ENTRY(11, 2),
     FASTRNN_MK_ENTRY(12, 2)},
    {FASTRNN_MK_ENTRY(1, 3), FASTRNN_MK_ENTRY(2, 3), FASTRNN_MK_ENTRY(3, 3), FASTRNN_MK_ENTRY(4, 3),
     FASTRNN_MK_ENTRY(5, 3), FASTRNN_MK_ENTRY(6, 3), FASTRNN_MK_ENTRY(7, 3), FASTRNN_MK_ENTRY(8, 3)},
    {FASTRNN_MK_ENTRY(1, 4), FASTRNN_MK_ENTRY(2, 4), FASTRNN_MK_ENTRY(3, 4), FASTRNN_MK_ENTRY(4, 4),
     FASTRNN_MK_ENTRY(5, 4), FASTRNN_MK_ENTRY(6, 4)},
#elif defined(FASTRNN_MK_AVX2_FMA)
    {FASTRNN_MK_ENTRY(1, 1), FASTRNN_MK_ENTRY(2, 1), FASTRNN_MK_ENTRY(3, 1), FASTRNN_MK_ENTRY(4, 1),
     FASTRNN_MK_ENTRY(5, 1), FASTRNN_MK_ENTRY(6, 1), FASTRNN_MK_ENTRY(7, 1), FASTRNN_MK_ENTRY(8, 1)},
    {FASTRNN_MK_ENTRY(1, 2), FASTRNN_MK_ENTRY(2, 2), FASTRNN_MK_ENTRY(3, 2), FASTRNN_MK_ENTRY(4, 2),
     FASTRNN_MK_ENTRY(5, 2)},
    {FASTRNN_MK_ENTRY(1, 3), FASTRNN_MK_ENTRY(2, 3), FASTRNN_MK_ENTRY(3, 3), FASTRNN_MK_ENTRY(4, 3)},
    {FASTRNN_MK_ENTRY(1, 4), FASTRNN_MK_ENTRY(2, 4), FASTRNN_MK_ENTRY(3, 4)},
#else
    {FASTRNN_MK_ENTRY(1, 1), FASTRNN_MK_ENTRY(2, 1), FASTRNN_MK_ENTRY(3, 1), FASTRNN_MK_ENTRY(4, 1)},
    {FASTRNN_MK_ENTRY(1, 2), FASTRNN_MK_ENTRY(2, 2), FASTRNN_MK_ENTRY(3, 2), FASTRNN_MK_ENTRY(4, 2)},
    {FASTRNN_MK_ENTRY(1, 3), FASTRNN_MK_ENTRY(2, 3), FASTRNN_MK_ENTRY(3, 3), FASTRNN_MK_ENTRY(4, 3)},
    {FASTRNN_MK_ENTRY(1, 4), FASTRNN_MK_ENTRY(2, 4), FASTRNN_MK_ENTRY(3, 4), FASTRNN_MK_ENTRY(4, 4)},
#endif
};

/* C rows [0, M) of one column group: tiles of the largest row count, then
 * the rows left. A few rows left (at most half a tile) share the last
 * whole tile's rows in two tiles of about equal size instead: a 2- or
 * 3-row tile loads as many panel vectors per k as a full one for a third
 * of its multiply-adds (6 x 4 AVX-512 tile 187-190 GFLOP/s, 4 x 4 and 5 x 4
 * 182, 2 x 4 and 3 x 4 126, in L1 on the Intel Xeon measured). The chains,
 * hence the bits, do not depend on the tiles. a(m, k) = a[m * a_rs + k *
 * a_cs]; C row m at c + m * ldc; see the top of this file for the rest.
 *
 * next_panel (or NULL): the panel the caller multiplies after this one,
 * ``panel_lines`` cache lines long. Where the packed weights do not fit L2,
 * every group's panel comes from L3 at its first tile, which then runs at
 * L3's latency; so the tiles of this group fetch the next panel into L2
 * meanwhile, each an equal share, a line per step of k (see
 * FASTRNN_MK_STREAM_BYTES in _tuning.h). */
static inline void fastrnn_mk_rows_of_group(
        ptrdiff_t M, int nv, ptrdiff_t K, const float* a, ptrdiff_t a_rs, ptrdiff_t a_cs,
        const float* panel, float* c, ptrdiff_t ldc, const ptrdiff_t* coff,
        const fastrnn_mask* mask, int init, const float* init_row,
        const float* next_panel, ptrdiff_t panel_lines) {
    int mr = fastrnn_mk_rows[nv];
    ptrdiff_t left = M % mr, whole_end = M - left, m = 0;
    if (left > 0 && 2 * left <= mr && whole_end >= mr)
        whole_end -= mr;        /* the last whole tile and the rows left: two tiles */
    ptrdiff_t tiles = whole_end / mr + (M - whole_end > mr ? 2 : M > whole_end ? 1 : 0);
    if (tiles < 1 || K < 1 || next_panel == NULL) panel_lines = 0;
    /* lines per tile: a tile fetches a line per step of k while it fetches
     * its own panel ahead (its first K - FASTRNN_MK_PREFETCH_K steps), so
     * with few tiles only the next panel's first lines */
    ptrdiff_t share = panel_lines > 0 ? (panel_lines + tiles - 1) / tiles : 0, first = 0;
    if (share > K - FASTRNN_MK_PREFETCH_K) share = K - FASTRNN_MK_PREFETCH_K;
    if (share < 0) share = 0;
    while (m < M) {
        ptrdiff_t rows = m < whole_end ? mr : M - m > mr ? (M - m + 1) / 2 : M - m;
        ptrdiff_t rest = panel_lines - first;
        ptrdiff_t lines = rest < share ? (rest > 0 ? rest : 0) : share;
        fastrnn_mk_table[nv - 1][rows - 1](
            K, a + m * a_rs, a_rs, a_cs, panel, c + m * ldc, ldc, coff, mask, init, init_row,
            lines > 0 ? next_panel + first * 16 : NULL, lines);
        first += lines;
        m += rows;
    }
}

/* Pack src's columns for the tiles: src(k, n) = src[k * s_k + n * s_n] for
 * k < K, n < N; the N columns are ``gates`` blocks of ``units`` columns
 * (column g * units + u: gate g of unit u). Group q holds unit blocks
 * [q * ub, (q + 1) * ub) of W units each, every gate of them: vector v =
 * b * gates + g (b the block within the group). Lanes past ``units`` are 0.
 * out: fastrnn_mk_packed_size floats. */
static inline ptrdiff_t fastrnn_mk_groups(ptrdiff_t units, int ub) {
    ptrdiff_t blocks = (units + FASTRNN_MK_LANES - 1) / FASTRNN_MK_LANES;
    return (blocks + ub - 1) / ub;
}
static inline ptrdiff_t fastrnn_mk_packed_size(ptrdiff_t K, ptrdiff_t units, int gates, int ub) {
    return fastrnn_mk_groups(units, ub) * K * ub * gates * FASTRNN_MK_LANES;
}
/* Rows [k0, k1) of fastrnn_mk_pack's one-gate layout of K rows whose
 * columns are adjacent (BPTT packs the saved activations so at every
 * training step, in blocks of rows between which it looks for Ctrl-C):
 * each group's row is a run of src's row. */
static inline void fastrnn_mk_pack_rows(const float* src, ptrdiff_t s_k, ptrdiff_t K,
                                        ptrdiff_t k0, ptrdiff_t k1, ptrdiff_t units, int ub,
                                        float* out) {
    ptrdiff_t groups = fastrnn_mk_groups(units, ub);
    ptrdiff_t width = (ptrdiff_t)ub * FASTRNN_MK_LANES;
    for (ptrdiff_t k = k0; k < k1; k++) {
        for (ptrdiff_t q = 0; q < groups; q++) {
            float* dst = out + (q * K + k) * width;
            ptrdiff_t n = units - q * width < width ? units - q * width : width;
            memcpy(dst, src + k * s_k + q * width, (size_t)n * sizeof(float));
            if (n < width) memset(dst + n, 0, (size_t)(width - n) * sizeof(float));
        }
    }
}

static inline void fastrnn_mk_pack(const float* src, ptrdiff_t s_k, ptrdiff_t s_n, ptrdiff_t K,
                                   ptrdiff_t units, int gates, int ub, float* out) {
    ptrdiff_t groups = fastrnn_mk_groups(units, ub);
    int nv = ub * gates;
    if (gates == 1 && s_n == 1) {
        fastrnn_mk_pack_rows(src, s_k, K, 0, K, units, ub, out);
        return;
    }
    for (ptrdiff_t q = 0; q < groups; q++) {
        float* panel = out + q * K * nv * FASTRNN_MK_LANES;
        for (ptrdiff_t k = 0; k < K; k++) {
            for (int b = 0; b < ub; b++) {
                for (int g = 0; g < gates; g++) {
                    float* dst = panel + (k * nv + b * gates + g) * FASTRNN_MK_LANES;
                    for (int l = 0; l < FASTRNN_MK_LANES; l++) {
                        ptrdiff_t u = (q * ub + b) * FASTRNN_MK_LANES + l;
                        dst[l] = u < units ? src[k * s_k + (g * units + u) * s_n] : 0.0f;
                    }
                }
            }
        }
    }
}

/* dst[c * rows + r] = src[r * ld + c] for r < rows, c < cols: BPTT's
 * blocks of dG transposed for the weight sums. Whole blocks of LANES x
 * LANES in registers (AVX-512 16 x 16, AVX2 8 x 8: rows interleaved in
 * pairs, then pairs of pairs within 128-bit lanes, then the lanes), the
 * edges one float at a time. sums (or NULL): sums[c] += src[r * ld + c],
 * r = 0, 1, ... in order (the bias gradients, from the rows already in
 * registers instead of another pass over dG); sums2 (or NULL) the same. */
#if defined(__AVX512F__) || defined(FASTRNN_MK_AVX2_FMA)
#define FASTRNN_MK_TRANSPOSE_TILE FASTRNN_MK_LANES

/* sums (or NULL) += the tile's rows, in their order */
FASTRNN_ALWAYS_INLINE void fastrnn_mk_add_rows(float* sums, const fastrnn_vec* a) {
    if (sums == NULL) return;
    fastrnn_vec acc = FASTRNN_VLOAD_PANEL(sums);
    FASTRNN_UNROLL(16) for (int i = 0; i < FASTRNN_MK_LANES; i++) acc = FASTRNN_VADD(acc, a[i]);
    fastrnn_mk_store(sums, acc, FASTRNN_MK_FULL);
}

/* The tile's LANES rows loaded (and added to the sums), then interleaved
 * in pairs and pairs of pairs within 128-bit lanes: a[4g + c], 128-bit
 * lane L, is then column 4L + c of rows 4g .. 4g + 3. */
FASTRNN_ALWAYS_INLINE void fastrnn_mk_transpose_quads(const float* src, ptrdiff_t ld,
                                                      fastrnn_vec* a, float* sums,
                                                      float* sums2) {
    fastrnn_vec t[FASTRNN_MK_LANES];
    FASTRNN_UNROLL(16) for (int i = 0; i < FASTRNN_MK_LANES; i++)
        a[i] = FASTRNN_VLOAD_PANEL(src + i * ld);
    fastrnn_mk_add_rows(sums, a);
    fastrnn_mk_add_rows(sums2, a);
    FASTRNN_UNROLL(8) for (int i = 0; i < FASTRNN_MK_LANES / 2; i++) {
        t[2 * i] = FASTRNN_VUNPACKLO(a[2 * i], a[2 * i + 1]);
        t[2 * i + 1] = FASTRNN_VUNPACKHI(a[2 * i], a[2 * i + 1]);
    }
    FASTRNN_UNROLL(4) for (int g = 0; g < FASTRNN_MK_LANES / 4; g++) {
        a[4 * g] = FASTRNN_VSHUFFLE(t[4 * g], t[4 * g + 2], 0x44);
        a[4 * g + 1] = FASTRNN_VSHUFFLE(t[4 * g], t[4 * g + 2], 0xEE);
        a[4 * g + 2] = FASTRNN_VSHUFFLE(t[4 * g + 1], t[4 * g + 3], 0x44);
        a[4 * g + 3] = FASTRNN_VSHUFFLE(t[4 * g + 1], t[4 * g + 3], 0xEE);
    }
}

/* One tile: the quads, then their 128-bit lanes to their columns' rows */
FASTRNN_ALWAYS_INLINE void fastrnn_mk_transpose_tile(const float* src, ptrdiff_t ld,
                                                     float* dst, ptrdiff_t ldd,
                                                     float* sums, float* sums2) {
    fastrnn_vec a[FASTRNN_MK_LANES];
    fastrnn_mk_transpose_quads(src, ld, a, sums, sums2);
#if defined(__AVX512F__)
    /* lanes of a[c], a[4 + c], a[8 + c], a[12 + c] transposed 4 x 4 */
    FASTRNN_UNROLL(4) for (int c = 0; c < 4; c++) {
        __m512 v0 = _mm512_shuffle_f32x4(a[c], a[4 + c], 0x88);
        __m512 v1 = _mm512_shuffle_f32x4(a[c], a[4 + c], 0xDD);
        __m512 v2 = _mm512_shuffle_f32x4(a[8 + c], a[12 + c], 0x88);
        __m512 v3 = _mm512_shuffle_f32x4(a[8 + c], a[12 + c], 0xDD);
        _mm512_storeu_ps(dst + c * ldd, _mm512_shuffle_f32x4(v0, v2, 0x88));
        _mm512_storeu_ps(dst + (4 + c) * ldd, _mm512_shuffle_f32x4(v1, v3, 0x88));
        _mm512_storeu_ps(dst + (8 + c) * ldd, _mm512_shuffle_f32x4(v0, v2, 0xDD));
        _mm512_storeu_ps(dst + (12 + c) * ldd, _mm512_shuffle_f32x4(v1, v3, 0xDD));
    }
#else
    /* lanes of a[c], a[4 + c] transposed 2 x 2 */
    FASTRNN_UNROLL(4) for (int c = 0; c < 4; c++) {
        _mm256_storeu_ps(dst + c * ldd, _mm256_permute2f128_ps(a[c], a[4 + c], 0x20));
        _mm256_storeu_ps(dst + (4 + c) * ldd, _mm256_permute2f128_ps(a[c], a[4 + c], 0x31));
    }
#endif
}
#else
#define FASTRNN_MK_TRANSPOSE_TILE 0
#endif

/* dst[c * rows + r] = v, and v added to the sums (in the order of r for
 * every c: the callers' loops) */
FASTRNN_ALWAYS_INLINE void fastrnn_mk_transpose_one(float v, ptrdiff_t r, ptrdiff_t c,
                                                    ptrdiff_t rows, float* dst, float* sums,
                                                    float* sums2) {
    dst[c * rows + r] = v;
    if (sums != NULL) sums[c] += v;
    if (sums2 != NULL) sums2[c] += v;
}

static inline void fastrnn_mk_transpose(const float* src, ptrdiff_t ld, ptrdiff_t rows,
                                        ptrdiff_t cols, float* dst, float* sums,
                                        float* sums2) {
    ptrdiff_t r0 = 0;
#if FASTRNN_MK_TRANSPOSE_TILE
    const ptrdiff_t tile = FASTRNN_MK_TRANSPOSE_TILE;
    for (; r0 + tile <= rows; r0 += tile)
        for (ptrdiff_t c = 0; c + tile <= cols; c += tile)
            fastrnn_mk_transpose_tile(src + r0 * ld + c, ld, dst + c * rows + r0, rows,
                                      sums == NULL ? NULL : sums + c,
                                      sums2 == NULL ? NULL : sums2 + c);
    ptrdiff_t c0 = cols - cols % tile;
    /* the columns past the last whole tile, in the rows done above */
    for (ptrdiff_t r = 0; r < r0; r++)
        for (ptrdiff_t c = c0; c < cols; c++)
            fastrnn_mk_transpose_one(src[r * ld + c], r, c, rows, dst, sums, sums2);
#endif
    /* the rows past the last whole tile (every row in the portable build):
     * 8 rows at a time, whose 8 source lines stay in L1 whatever ld */
    for (; r0 < rows; r0 += 8) {
        ptrdiff_t r1 = rows < r0 + 8 ? rows : r0 + 8;
        for (ptrdiff_t c = 0; c < cols; c++)
            for (ptrdiff_t r = r0; r < r1; r++)
                fastrnn_mk_transpose_one(src[r * ld + c], r, c, rows, dst, sums, sums2);
    }
}

/* A group's column offsets in a C row laid out [gate][ld_gate] (gate g of
 * unit u at g * ld_gate + u - unit0: C may start at unit unit0) and its lane
 * masks. The offsets come out final here: adjusted by a second pass, which
 * GCC vectorised, a 16-byte load read back two 8-byte stores just made and
 * waited for them at every group (no store forwarding; 30% of the unit
 * split's own time at batch 1). */
static inline void fastrnn_mk_group_columns(ptrdiff_t q, ptrdiff_t units, int gates, int ub,
                                            ptrdiff_t ld_gate, ptrdiff_t unit0,
                                            ptrdiff_t* coff, fastrnn_mask* mask) {
    for (int b = 0; b < ub; b++) {
        ptrdiff_t u0 = (q * ub + b) * FASTRNN_MK_LANES;
        ptrdiff_t left = units - u0;
        fastrnn_mask m = left >= FASTRNN_MK_LANES ? FASTRNN_MK_FULL
                       : left > 0 ? FASTRNN_MK_FIRST(left) : 0u;
        for (int g = 0; g < gates; g++) {
            coff[b * gates + g] = g * ld_gate + (left > 0 ? u0 : 0) - unit0;
            mask[b * gates + g] = m;
        }
    }
}

/* The float32 FMA peak of one thread: FASTRNN_MK_PEAK_CHAINS independent
 * accumulators (enough to cover the FMA latency on every pipe), a fused
 * multiply-add each per iteration, nothing loaded or stored in the loop.
 * ``iters`` iterations do iters * CHAINS * LANES * 2 flops; the sum goes to
 * *sink so that the loop is not optimised away. (The portable build has no
 * FMA: its "peak" is its mul + add loop.) */
#define FASTRNN_MK_PEAK_CHAINS 12
static inline void fastrnn_mk_fma_loop(long long iters, float* sink) {
    fastrnn_vec acc[FASTRNN_MK_PEAK_CHAINS];
    fastrnn_vec w = FASTRNN_VBCAST(0.999999f), x = FASTRNN_VBCAST(1e-6f);
    float total[FASTRNN_MK_LANES];
    for (int j = 0; j < FASTRNN_MK_PEAK_CHAINS; j++) acc[j] = FASTRNN_VBCAST((float)j);
    for (long long i = 0; i < iters; i++) {
        FASTRNN_UNROLL(12) for (int j = 0; j < FASTRNN_MK_PEAK_CHAINS; j++)
            acc[j] = FASTRNN_VFMA(acc[j], w, x);
    }
    for (int j = 1; j < FASTRNN_MK_PEAK_CHAINS; j++) acc[0] = FASTRNN_VFMA(acc[j], w, acc[0]);
    fastrnn_mk_store(total, acc[0], FASTRNN_MK_FULL);
    *sink = total[0];
}

#endif
