/* The int8 products of quantized inference (fastrnn/_quant.pyx): activations
 * quantized per row, weights packed once, int32 sums.
 *
 * Integer results are exact and the same in every build: the sums of
 * int8 x int8 products are exact in int32 for K up to FASTRNN_Q_MAX_K (the
 * callers refuse larger), whatever the order. The builds differ only in the
 * instructions:
 *
 *   AVX-512 VNNI  vpdpbusd (4 u8 x s8 products summed into each int32 lane,
 *                 no intermediate saturation). It needs an unsigned operand:
 *                 the activations are stored as q + 128 (u8, 1..255) and
 *                 the accumulators start from -128 * sum_k W[n][k] (the
 *                 column sums, made when packing), so the sum is q . w.
 *   AVX2          vpmaddubsw on |q| and sign(w, q): products of at most
 *                 127 * 127, summed in pairs into int16 (2 * 16129 = 32258 <
 *                 32767, never saturates), then vpmaddwd by 1 into int32.
 *                 Needs q, w in [-127, 127], which symmetric quantization
 *                 gives. The AVX-512 build without VNNI runs this too.
 *   portable      plain int32 loops.
 *   AMX           (the _quant_amx build, where Linux grants the tiles) the
 *                 VNNI build's operands as tiles, TDPBUSD: products of 16
 *                 rows or more, in tiles of 16 (the last one overlapping
 *                 the one before); fewer rows, and products of one
 *                 column group over K <= 64, run on VNNI. (Its bfloat16
 *                 products, TDPBF16PS, are not the same bits as the
 *                 others': see the bfloat16 part below.)
 *
 * Layout. A weight matrix W (N output rows, K inputs; PyTorch's layout) is
 * packed in blocks of 16 output columns; in each block, for each quad of 4
 * consecutive k, 64 bytes: column l's 4 weights at bytes 4l..4l+3. K is
 * padded to quads and N to blocks with zero weights. An activation row is
 * quads * 4 bytes (padding: the quantized zero). The int32 results have
 * blocks * 16 columns (the padding columns get 0).
 *
 * Quantizing an activation row x (K floats): amax = max |x_k|; a row with
 * amax below FASTRNN_Q_MIN_AMAX (127 FLT_MIN, ~1.5e-36: its scale would be
 * subnormal, which the kernels flush to zero) quantizes to zeros with scale 0,
 * a row holding NaN or inf to zeros with scale -1 (the callers refuse it);
 * else q_k = round-half-even(x_k * (127 / amax)) clamped to [-127, 127]
 * and scale = amax / 127, all in float32 (the rounding by adding and
 * subtracting 1.5 * 2^23, which is exact for |v| < 2^22 and the same on
 * every CPU). The kernels' module is compiled with -ffp-contract=off so
 * that no build fuses a multiply and an add the others do not.
 */
#ifndef FASTRNN_QKERNEL_H
#define FASTRNN_QKERNEL_H

#include <float.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "_tuning.h"   /* FASTRNN_Q_GROUPS_OUTER_BYTES */
#include "_portable.h" /* FASTRNN_HOLD */

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define FASTRNN_Q_VNNI 1
#include <immintrin.h>
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__linux__)
#define FASTRNN_Q_AMX 1
#define FASTRNN_Q_ISA "amx-int8"
#else
#define FASTRNN_Q_ISA "avx512vnni"
#endif
#define FASTRNN_Q_OFFSET 128
#define FASTRNN_Q_NV 4
#elif defined(__AVX2__)
#define FASTRNN_Q_AVX2 1
#include <immintrin.h>
#define FASTRNN_Q_ISA "avx2"
#define FASTRNN_Q_OFFSET 0
#define FASTRNN_Q_NV 2
#else
#define FASTRNN_Q_ISA "portable"
#define FASTRNN_Q_OFFSET 0
#define FASTRNN_Q_NV 2
#endif

#if defined(__AVX2__)
/* The AVX2 tiles' output (int8 and bfloat16), 8 columns of it: with n > 0
 * the columns left in the row, y[j] = add[j] + p[j] (add NULL: p[j]) for j
 * < min(n, 8): a whole vector with plain loads and stores, masked ones only
 * at a row's end. A masked store
 * (vmaskmovps) takes ~4 ns on an AMD EPYC (Zen 3) against 0.35 ns for a
 * plain one (a loop of each, 2026-12-07). */
static inline void fastrnn_q_put8(float* y, const float* add, __m256 p, ptrdiff_t n,
                                  __m256i lane) {
    if (n >= 8) {
        if (add != NULL) p = _mm256_add_ps(_mm256_loadu_ps(add), p);
        _mm256_storeu_ps(y, p);
        return;
    }
    __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), lane);
    if (add != NULL) p = _mm256_add_ps(_mm256_maskload_ps(add, mask), p);
    _mm256_maskstore_ps(y, mask, p);
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
/* the first min(left, 16) lanes (a row's last values, a tile's last columns) */
static inline __mmask16 fastrnn_row_mask(ptrdiff_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
}
#endif

/* the largest K whose sums cannot overflow int32 in any build (VNNI's
 * offset sums reach 255 * 127 * K) */
#define FASTRNN_Q_MAX_K 65536

static inline ptrdiff_t fastrnn_q_quads(ptrdiff_t K) { return (K + 3) / 4; }

/* The least max |x| of a row (or of a weight row: quantize_weight) that
 * quantizes with a scale, amax / 127 >= FLT_MIN: a subnormal scale would be
 * flushed to zero (exactly 127 * 2^-126) */
#define FASTRNN_Q_MIN_AMAX (127.0f * FLT_MIN)
/* blocks of 16 columns, padded to whole groups of FASTRNN_Q_NV blocks */
static inline ptrdiff_t fastrnn_q_blocks(ptrdiff_t N) {
    return (N + 16 * FASTRNN_Q_NV - 1) / (16 * FASTRNN_Q_NV) * FASTRNN_Q_NV;
}
static inline ptrdiff_t fastrnn_q_packed_size(ptrdiff_t K, ptrdiff_t N) {
    return fastrnn_q_blocks(N) * fastrnn_q_quads(K) * 64;
}

/* Pack W (N rows ldw apart, K int8 each) into out (fastrnn_q_packed_size
 * bytes); comp (blocks * 16 int32) gets -OFFSET * (the column sums). */
static void fastrnn_q_pack(const int8_t* w, ptrdiff_t ldw, ptrdiff_t K, ptrdiff_t N,
                           int8_t* out, int32_t* comp) {
    ptrdiff_t quads = fastrnn_q_quads(K), blocks = fastrnn_q_blocks(N);
    ptrdiff_t nb, kq, l, j;
    for (nb = 0; nb < blocks; nb++) {
        for (l = 0; l < 16; l++) {
            ptrdiff_t col = nb * 16 + l;
            int32_t sum = 0;
            for (kq = 0; kq < quads; kq++) {
                for (j = 0; j < 4; j++) {
                    ptrdiff_t k = kq * 4 + j;
                    int8_t v = (col < N && k < K) ? w[col * ldw + k] : 0;
                    out[((nb * quads + kq) * 16 + l) * 4 + j] = v;
                    sum += v;
                }
            }
            comp[col] = -FASTRNN_Q_OFFSET * sum;
        }
    }
}

/* The inverse of fastrnn_q_pack: W (N rows ldw apart, K int8 each) from
 * the packed panels. */
static void fastrnn_q_unpack(const int8_t* packed, ptrdiff_t K, ptrdiff_t N, int8_t* w,
                             ptrdiff_t ldw) {
    ptrdiff_t quads = fastrnn_q_quads(K), n, k;
    for (n = 0; n < N; n++)
        for (k = 0; k < K; k++)
            w[n * ldw + k] = packed[(((n / 16) * quads + k / 4) * 16 + n % 16) * 4 + k % 4];
}

/* Quantize one row x (K floats) into q (quads * 4 bytes, the build's
 * format); returns its scale (-1: x is not finite). */
#if defined(__AVX512F__) && defined(__AVX512BW__)
/* The AVX-512 builds' loops of fastrnn_q_row and fastrnn_b_row, written
 * out: the same operations as the plain loops below (which GCC vectorises
 * into masked selects and packs: 0.25 us a row of 510 values, a third of
 * an int8 wide-b500 call), 16 values at a time, the last ones masked. */
#define FASTRNN_ROW_SIMD 1

/* max |x_k| as a bit pattern (see fastrnn_q_row); next (or NULL): the row
 * quantized after this one, fetched into L1 a line per line of this one */
static inline uint32_t fastrnn_row_top(const float* x, ptrdiff_t K, const float* next) {
    const __m512i abs_bits = _mm512_set1_epi32(0x7fffffff);
    __m512i top = _mm512_setzero_si512();
    ptrdiff_t k;
    if (next != NULL)
        for (k = 0; k + 16 <= K; k += 16) {
            _mm_prefetch((const char*)(next + k), _MM_HINT_T0);
            top = _mm512_max_epu32(top, _mm512_and_si512(_mm512_loadu_si512(x + k), abs_bits));
        }
    else
        for (k = 0; k + 16 <= K; k += 16)
            top = _mm512_max_epu32(top, _mm512_and_si512(_mm512_loadu_si512(x + k), abs_bits));
    if (k < K)
        top = _mm512_max_epu32(top, _mm512_and_si512(
            _mm512_maskz_loadu_epi32(fastrnn_row_mask(K - k), x + k), abs_bits));
    return (uint32_t)_mm512_reduce_max_epu32(top);
}

/* q_k = round-half-even(x_k * inv) clamped to [-127, 127], plus OFFSET */
static inline void fastrnn_row_round(const float* x, ptrdiff_t K, float inv, int8_t* q) {
    const __m512 scale = _mm512_set1_ps(inv), magic = _mm512_set1_ps(12582912.0f);
    const __m512 hi = _mm512_set1_ps(127.0f), lo = _mm512_set1_ps(-127.0f);
    const __m512i offset = _mm512_set1_epi32(FASTRNN_Q_OFFSET);
    ptrdiff_t k;
    for (k = 0; k < K; k += 16) {
        __mmask16 m = fastrnn_row_mask(K - k);
        __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + k), scale);
        v = _mm512_sub_ps(_mm512_add_ps(v, magic), magic);
        v = _mm512_max_ps(_mm512_min_ps(v, hi), lo);
        _mm512_mask_cvtepi32_storeu_epi8(
            q + k, m, _mm512_add_epi32(_mm512_cvttps_epi32(v), offset));
    }
}
#endif

/* next (or NULL): the row the caller quantizes after this one, which the
 * AVX-512 builds fetch ahead while they read this one. A layer's input rows
 * come from memory, not cache (wide-b500: 2500 rows of 510 floats, 5 MB):
 * the loads of the maximum's pass waited on them (an int8 call's largest
 * cost, and no faster with two threads); fetched a row ahead, 2500 x 510
 * rows take 0.20 ms instead of 0.31 on one thread (Intel Xeon, a C copy of
 * the loop); the whole row fetched into L2 at its start 0.27. */
static inline float fastrnn_q_row(const float* x, ptrdiff_t K, int8_t* q,
                                  const float* next) {
    ptrdiff_t k, padded = fastrnn_q_quads(K) * 4;
    float amax, inv, v;
    uint32_t top = 0;
    /* max |x_k| on the bit patterns: for finite floats without the sign
     * bit, integer order is float order, and an integer max reduction
     * vectorises (a float one does not without -ffast-math) */
#if defined(FASTRNN_ROW_SIMD)
    top = fastrnn_row_top(x, K, next);
#else
    (void)next;
    for (k = 0; k < K; k++) {
        uint32_t bits;
        memcpy(&bits, x + k, 4);
        bits &= 0x7fffffffu;
        top = bits > top ? bits : top;
    }
#endif
    memcpy(&amax, &top, 4);
    if (top >= 0x7f800000u || !(amax >= FASTRNN_Q_MIN_AMAX)) {
        /* a zero (or tiny) row: zeros, scale 0; a row with NaN or inf:
         * zeros, and -1 tells the caller */
        memset(q, FASTRNN_Q_OFFSET, (size_t)padded);
        return top >= 0x7f800000u ? -1.0f : 0.0f;
    }
    inv = 127.0f / amax;
#if defined(FASTRNN_ROW_SIMD)
    (void)v;
    fastrnn_row_round(x, K, inv, q);
    k = K;
#else
    for (k = 0; k < K; k++) {
        v = x[k] * inv;
        v = (v + 12582912.0f) - 12582912.0f;   /* round half to even */
        v = v > 127.0f ? 127.0f : v;
        v = v < -127.0f ? -127.0f : v;
        q[k] = (int8_t)(uint8_t)((int)v + FASTRNN_Q_OFFSET);
    }
#endif
    for (; k < padded; k++)
        q[k] = (int8_t)(uint8_t)FASTRNN_Q_OFFSET;
    return amax / 127.0f;
}

static inline int32_t fastrnn_q_load4(const int8_t* p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Where a product's sums go. With y NULL: the int32 sums to c (rows ldc
 * apart, whole blocks). Else dequantized in the tile, columns n < cols
 * only: y[m][n] = add[m][n] + float(sum) * (rs[m] * cs[n]), add rows
 * ld_add apart (0: one row, a bias, for all; add NULL: nothing added; add
 * may be y itself), cs padded to whole blocks. The float32 operations are
 * those of the order written, in every build. */
typedef struct {
    int32_t* c;
    ptrdiff_t ldc;
    const float* rs;
    const float* cs;
    const float* add;
    ptrdiff_t ld_add;
    float* y;
    ptrdiff_t ldy;
    ptrdiff_t cols;
} fastrnn_q_out;

/* The tiles: rows [m0, m0 + rows) of a (lda bytes apart, a pointing at
 * row m0) times FASTRNN_Q_NV blocks of the packed panel (bstride bytes
 * from one block to the next), the group's columns starting at col0. Every
 * accumulator is a named variable (GCC keeps an array of vectors in
 * memory). The one-row tile keeps two sums per column, over the even and
 * the odd quads (integer sums: the order does not matter), for twice the
 * chains in flight. */
#define FASTRNN_Q_ARGS ptrdiff_t quads, const int8_t* a, ptrdiff_t lda, const int8_t* panel, \
    ptrdiff_t bstride, const int32_t* comp, const fastrnn_q_out* o, ptrdiff_t m0, ptrdiff_t col0

#if defined(FASTRNN_Q_VNNI)
static inline void fastrnn_q_emit(const fastrnn_q_out* o, ptrdiff_t m, ptrdiff_t col0,
                                  __m512i v0, __m512i v1, __m512i v2, __m512i v3) {
    __m512i v[4];
    __m512 sr, p;
    ptrdiff_t k, left = o->cols - col0;
    float* y;
    const float* add;
    v[0] = v0; v[1] = v1; v[2] = v2; v[3] = v3;
    if (o->y == NULL) {
        for (k = 0; k < 4; k++)
            _mm512_storeu_si512((void*)(o->c + m * o->ldc + col0 + 16 * k), v[k]);
        return;
    }
    sr = _mm512_set1_ps(o->rs[m]);
    y = o->y + m * o->ldy + col0;
    add = o->add == NULL ? NULL : o->add + m * o->ld_add + col0;
    for (k = 0; k < 4 && left > 16 * k; k++) {
        __mmask16 mask = fastrnn_row_mask(left - 16 * k);
        p = _mm512_mul_ps(_mm512_cvtepi32_ps(v[k]),
                          _mm512_mul_ps(sr, _mm512_loadu_ps(o->cs + col0 + 16 * k)));
        if (add != NULL)
            p = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, add + 16 * k), p);
        _mm512_mask_storeu_ps(y + 16 * k, mask, p);
    }
}

#define Q_DP _mm512_dpbusd_epi32
/* Each weight vector loaded into a register once a step of k: left to
 * itself GCC folded the loads of the 2- and 3-row tiles into their
 * multiply-adds, a load per row, and those tiles took as long as 2 and 3
 * one-row passes over a panel from L2 (512 x 2048 weights, one thread:
 * 21 and 32 us, against 13 and 15 us with the loads held; 4 rows 18) */
#define Q_LOADW(v)                                                                      \
    __m512i w##v = _mm512_loadu_si512((const void*)(panel + (v) * bstride + kq * 64)); \
    FASTRNN_HOLD(w##v)
#define Q_INIT(r) __m512i c##r##0 = s0, c##r##1 = s1, c##r##2 = s2, c##r##3 = s3
#define Q_ROW(r) b = _mm512_set1_epi32(fastrnn_q_load4(a + (r) * lda + kq * 4));            \
    c##r##0 = Q_DP(c##r##0, b, w0); c##r##1 = Q_DP(c##r##1, b, w1);                         \
    c##r##2 = Q_DP(c##r##2, b, w2); c##r##3 = Q_DP(c##r##3, b, w3)
#define Q_STORE(r) fastrnn_q_emit(o, m0 + (r), col0, c##r##0, c##r##1, c##r##2, c##r##3)
#define Q_START __m512i s0 = _mm512_loadu_si512((const void*)comp),                         \
    s1 = _mm512_loadu_si512((const void*)(comp + 16)),                                      \
    s2 = _mm512_loadu_si512((const void*)(comp + 32)),                                      \
    s3 = _mm512_loadu_si512((const void*)(comp + 48)), b

/* A tile of R rows: each step of k loads the column group's 4 vectors once
 * for all R rows. Tiles of 6 rows, then 3 to 5 for the rows left after
 * them: every tile streams its column group's panel once, so 4 rows as two
 * tiles of 2 read the weights twice. At 2 threads, both builds in one
 * process, calls interleaved: int8 long-b8 (4 rows a part) 92.5 -> 63.3
 * ms, b32-h128 LSTM (6 + 6 + 4 rows a part) 2.14 -> 1.98 ms, ds2-b20 (6 +
 * 4) 93.5 -> 82.0 ms; seed-keras-b32-h50 (K = 1 and 50) and wide-b500 the
 * same. */
#define Q_TILE(R, INITS, ROWS, STORES)                                                \
    static void fastrnn_q_tile##R(FASTRNN_Q_ARGS) {                                   \
        ptrdiff_t kq;                                                                \
        Q_START;                                                                     \
        INITS;                                                                       \
        for (kq = 0; kq < quads; kq++) {                                             \
            Q_LOADW(0); Q_LOADW(1); Q_LOADW(2); Q_LOADW(3);                          \
            ROWS;                                                                    \
        }                                                                            \
        STORES;                                                                      \
    }
Q_TILE(6, Q_INIT(0); Q_INIT(1); Q_INIT(2); Q_INIT(3); Q_INIT(4); Q_INIT(5),
       Q_ROW(0); Q_ROW(1); Q_ROW(2); Q_ROW(3); Q_ROW(4); Q_ROW(5),
       Q_STORE(0); Q_STORE(1); Q_STORE(2); Q_STORE(3); Q_STORE(4); Q_STORE(5))
Q_TILE(2, Q_INIT(0); Q_INIT(1), Q_ROW(0); Q_ROW(1), Q_STORE(0); Q_STORE(1))
Q_TILE(3, Q_INIT(0); Q_INIT(1); Q_INIT(2), Q_ROW(0); Q_ROW(1); Q_ROW(2),
       Q_STORE(0); Q_STORE(1); Q_STORE(2))
Q_TILE(4, Q_INIT(0); Q_INIT(1); Q_INIT(2); Q_INIT(3),
       Q_ROW(0); Q_ROW(1); Q_ROW(2); Q_ROW(3),
       Q_STORE(0); Q_STORE(1); Q_STORE(2); Q_STORE(3))
Q_TILE(5, Q_INIT(0); Q_INIT(1); Q_INIT(2); Q_INIT(3); Q_INIT(4),
       Q_ROW(0); Q_ROW(1); Q_ROW(2); Q_ROW(3); Q_ROW(4),
       Q_STORE(0); Q_STORE(1); Q_STORE(2); Q_STORE(3); Q_STORE(4))

static void fastrnn_q_tile1(FASTRNN_Q_ARGS) {
    ptrdiff_t kq;
    const __m512i zero = _mm512_setzero_si512();
    Q_START;
    __m512i c00 = s0, c01 = s1, c02 = s2, c03 = s3;
    __m512i c10 = zero, c11 = zero, c12 = zero, c13 = zero;
    for (kq = 0; kq + 1 < quads; kq += 2) {
        Q_LOADW(0); Q_LOADW(1); Q_LOADW(2); Q_LOADW(3);
        Q_ROW(0);
        kq++;
        {
            Q_LOADW(0); Q_LOADW(1); Q_LOADW(2); Q_LOADW(3);
            b = _mm512_set1_epi32(fastrnn_q_load4(a + kq * 4));
            c10 = Q_DP(c10, b, w0); c11 = Q_DP(c11, b, w1);
            c12 = Q_DP(c12, b, w2); c13 = Q_DP(c13, b, w3);
        }
        kq--;
    }
    if (kq < quads) {
        Q_LOADW(0); Q_LOADW(1); Q_LOADW(2); Q_LOADW(3);
        Q_ROW(0);
    }
    c00 = _mm512_add_epi32(c00, c10); c01 = _mm512_add_epi32(c01, c11);
    c02 = _mm512_add_epi32(c02, c12); c03 = _mm512_add_epi32(c03, c13);
    Q_STORE(0);
}
#define FASTRNN_Q_BIG 6

#elif defined(FASTRNN_Q_AVX2)
/* a block is two ymm (columns 0-7, 8-15): w0, w1 of the first block, w2, w3
 * of the second */
static inline void fastrnn_q_emit(const fastrnn_q_out* o, ptrdiff_t m, ptrdiff_t col0,
                                  __m256i v0, __m256i v1, __m256i v2, __m256i v3) {
    __m256i v[4];
    __m256 sr, p;
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    ptrdiff_t k, left = o->cols - col0;
    float* y;
    const float* add;
    v[0] = v0; v[1] = v1; v[2] = v2; v[3] = v3;
    if (o->y == NULL) {
        for (k = 0; k < 4; k++)
            _mm256_storeu_si256((__m256i*)(o->c + m * o->ldc + col0 + 8 * k), v[k]);
        return;
    }
    sr = _mm256_set1_ps(o->rs[m]);
    y = o->y + m * o->ldy + col0;
    add = o->add == NULL ? NULL : o->add + m * o->ld_add + col0;
    for (k = 0; k < 4 && left > 8 * k; k++) {
        p = _mm256_mul_ps(_mm256_cvtepi32_ps(v[k]),
                          _mm256_mul_ps(sr, _mm256_loadu_ps(o->cs + col0 + 8 * k)));
        fastrnn_q_put8(y + 8 * k, add == NULL ? NULL : add + 8 * k, p, left - 8 * k, lane);
    }
}

#define Q_LOADW(v) __m256i w##v = _mm256_loadu_si256(                                       \
    (const __m256i*)(panel + ((v) / 2) * bstride + kq * 64 + ((v) % 2) * 32))
#define Q_MAC(acc, w) acc = _mm256_add_epi32(acc, _mm256_madd_epi16(                         \
    _mm256_maddubs_epi16(mag, _mm256_sign_epi8(w, b)), ones))
#define Q_INIT(r) __m256i c##r##0 = zero, c##r##1 = zero, c##r##2 = zero, c##r##3 = zero
#define Q_ROW(r) b = _mm256_set1_epi32(fastrnn_q_load4(a + (r) * lda + kq * 4));           \
    mag = _mm256_abs_epi8(b);                                                                \
    Q_MAC(c##r##0, w0); Q_MAC(c##r##1, w1); Q_MAC(c##r##2, w2); Q_MAC(c##r##3, w3)
#define Q_STORE(r) fastrnn_q_emit(o, m0 + (r), col0, c##r##0, c##r##1, c##r##2, c##r##3)
#define Q_START const __m256i ones = _mm256_set1_epi16(1), zero = _mm256_setzero_si256();   \
    __m256i b, mag; (void)comp

#if defined(__AVX512VL__)
static void fastrnn_q_tile4(FASTRNN_Q_ARGS) {
    ptrdiff_t kq;
    Q_START;
    Q_INIT(0); Q_INIT(1); Q_INIT(2); Q_INIT(3);
    for (kq = 0; kq < quads; kq++) {
        Q_LOADW(0); Q_LOADW(1); Q_LOADW(2); Q_LOADW(3);
        Q_ROW(0); Q_ROW(1); Q_ROW(2); Q_ROW(3);
    }
    Q_STORE(0); Q_STORE(1); Q_STORE(2); Q_STORE(3);
}
#define FASTRNN_Q_BIG 4
#define fastrnn_q_tile_big fastrnn_q_tile4
#endif

static void fastrnn_q_tile2(FASTRNN_Q_ARGS) {
    ptrdiff_t kq;
    Q_START;
    Q_INIT(0); Q_INIT(1);
    for (kq = 0; kq < quads; kq++) {
        Q_LOADW(0); Q_LOADW(1); Q_LOADW(2); Q_LOADW(3);
        Q_ROW(0); Q_ROW(1);
    }
    Q_STORE(0); Q_STORE(1);
}

static void fastrnn_q_tile1(FASTRNN_Q_ARGS) {
    ptrdiff_t kq;
    Q_START;
    Q_INIT(0);
    for (kq = 0; kq < quads; kq++) {
        Q_LOADW(0); Q_LOADW(1); Q_LOADW(2); Q_LOADW(3);
        Q_ROW(0);
    }
    Q_STORE(0);
}
#ifndef FASTRNN_Q_BIG
#define FASTRNN_Q_BIG 2
#define fastrnn_q_tile_big fastrnn_q_tile2
#endif

#else
static void fastrnn_q_tile1(FASTRNN_Q_ARGS) {
    int32_t acc[16];
    ptrdiff_t kq, col;
    int v, l, j;
    (void)comp;
    (void)lda;
    for (v = 0; v < FASTRNN_Q_NV; v++) {
        const int8_t* p = panel + v * bstride;
        for (l = 0; l < 16; l++)
            acc[l] = 0;
        for (kq = 0; kq < quads; kq++) {
            const int8_t* ak = a + kq * 4;
            const int8_t* pk = p + kq * 64;
            for (l = 0; l < 16; l++)
                for (j = 0; j < 4; j++)
                    acc[l] += (int32_t)ak[j] * (int32_t)pk[l * 4 + j];
        }
        col = col0 + 16 * v;
        if (o->y == NULL) {
            for (l = 0; l < 16; l++)
                o->c[m0 * o->ldc + col + l] = acc[l];
        } else {
            float s = o->rs[m0];
            float* y = o->y + m0 * o->ldy;
            const float* add = o->add == NULL ? NULL : o->add + m0 * o->ld_add;
            for (l = 0; l < 16 && col + l < o->cols; l++) {
                float prod = (float)acc[l] * (s * o->cs[col + l]);
                y[col + l] = add == NULL ? prod : add[col + l] + prod;
            }
        }
    }
}
static void fastrnn_q_tile2(FASTRNN_Q_ARGS) {
    fastrnn_q_tile1(quads, a, lda, panel, bstride, comp, o, m0, col0);
    fastrnn_q_tile1(quads, a + lda, lda, panel, bstride, comp, o, m0 + 1, col0);
}
#define FASTRNN_Q_BIG 2
#define fastrnn_q_tile_big fastrnn_q_tile2
#endif
#ifndef fastrnn_q_tile_big
#define fastrnn_q_tile_big fastrnn_q_tile6
#endif

/* The rows left after the big tiles (0 < rows < FASTRNN_Q_BIG), over one
 * column group: on VNNI one tile of them all, else tiles of 2 and one of 1. */
static inline void fastrnn_q_tile_rest(ptrdiff_t rows, FASTRNN_Q_ARGS) {
#if defined(FASTRNN_Q_VNNI)
    switch (rows) {
    case 5: fastrnn_q_tile5(quads, a, lda, panel, bstride, comp, o, m0, col0); return;
    case 4: fastrnn_q_tile4(quads, a, lda, panel, bstride, comp, o, m0, col0); return;
    case 3: fastrnn_q_tile3(quads, a, lda, panel, bstride, comp, o, m0, col0); return;
    default: break;
    }
#endif
    for (; rows >= 2; rows -= 2, a += 2 * lda, m0 += 2)
        fastrnn_q_tile2(quads, a, lda, panel, bstride, comp, o, m0, col0);
    if (rows > 0)
        fastrnn_q_tile1(quads, a, lda, panel, bstride, comp, o, m0, col0);
}

/* Where the big tiles stop: at the last whole one, except on VNNI when 1 or
 * 2 rows would be left: one tile earlier, and its rows and the rest run as
 * two even tiles (fastrnn_q_tiles_after: 8 rows as 4 + 4, not 6 + 2). A thin
 * tile streams the same panel for few rows: over 512 x 2048 weights, one
 * thread, 2 rows ~350 G integer ops a second, 4 rows ~530, 6 rows ~560. */
static inline ptrdiff_t fastrnn_q_big_end(ptrdiff_t M) {
    ptrdiff_t end = M - M % FASTRNN_Q_BIG;
#if defined(FASTRNN_Q_VNNI)
    if (end > 0 && M % FASTRNN_Q_BIG > 0 && M % FASTRNN_Q_BIG < 3)
        end -= FASTRNN_Q_BIG;
#endif
    return end;
}

/* The rows from fastrnn_q_big_end on (fewer than 2 * FASTRNN_Q_BIG) */
static inline void fastrnn_q_tiles_after(ptrdiff_t rows, FASTRNN_Q_ARGS) {
    if (rows >= FASTRNN_Q_BIG) {
        ptrdiff_t first = rows - rows / 2;
        fastrnn_q_tile_rest(first, quads, a, lda, panel, bstride, comp, o, m0, col0);
        rows -= first;
        a += first * lda;
        m0 += first;
    }
    fastrnn_q_tile_rest(rows, quads, a, lda, panel, bstride, comp, o, m0, col0);
}

#if defined(FASTRNN_Q_AMX)
/* AMX (Intel's tile matrix unit: TDPBUSD, 16 x 64 u8 times 16 x 64 s8 into
 * 16 x 16 int32, 16384 multiply-adds an instruction; measured here 3.8
 * T a second, 8x vpdpbusd's 474 G): the same exact integer sums. A block's
 * packed panel is already a B tile's layout (a row per quad of k, column
 * l's 4 weights at bytes 4l..4l+3), and a VNNI activation row (u8, the
 * offset) an A tile's row. Linux grants a process the tiles' state on
 * request (arch_prctl, kernel 5.16+): fastrnn_q_amx_enable, at import;
 * until it succeeds the products stay on VNNI. */
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

static int fastrnn_q_amx_enabled = 0;

/* 1 if this CPU has AMX-TILE and AMX-INT8 and the kernel granted this
 * process their state (then the products run on the tiles) */
static int fastrnn_q_amx_enable(void) {
    unsigned int eax, ebx, ecx, edx;
    if (fastrnn_q_amx_enabled)
        return 1;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)
            || !(edx & (1u << 24)) || !(edx & (1u << 25)))
        return 0;
    /* ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA */
    if (syscall(SYS_arch_prctl, 0x1023, 18) != 0)
        return 0;
    fastrnn_q_amx_enabled = 1;
    return 1;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} fastrnn_q_tilecfg;

/* Load a tile configuration unless it is the one loaded: LDTILECFG takes
 * ~65 ns here, STTILECFG and a compare ~2 (a batch-1 step split between two
 * threads makes one product per gate a step in each). The tiles stay configured
 * after a product; each part of a call releases them when it ends
 * (fastrnn_amx_release). Another library's tile use in between shows as
 * another (or no) configuration, so it is loaded again. */
static inline void fastrnn_amx_config(const fastrnn_q_tilecfg* want) {
    fastrnn_q_tilecfg loaded;
    _tile_storeconfig(&loaded);
    if (memcmp(&loaded, want, sizeof loaded) != 0)
        _tile_loadconfig(want);
}

/* The tiles back in their initial state (nothing for a context switch to
 * save): at the end of each part of a call that ran products. */
static inline void fastrnn_amx_release(void) {
    if (fastrnn_q_amx_enabled)
        _tile_release();
}

/* The tile shared by the int8 and bfloat16 products: the sums of one tile
 * of rows (A: a_rows, lda bytes apart) by FASTRNN_Q_NV = 4 blocks of a packed
 * panel (bstride bytes from block to block), over ``units`` 4-byte k-units
 * (int8 quads, bf16 pairs), into sums (16 x 64 int32 or float32, 256 bytes
 * a row), by DP (TDPBUSD or TDPBF16PS). Tiles 0-3: the sums of the 4 blocks;
 * 4, 5: A and B over 16 k-units; 6, 7: A and B over the last units % 16. */
/* one step of k: A (tile ta) times the 4 blocks' B (tile tb, loaded in turn) */
#define FASTRNN_AMX_STEP(DP, ta, tb)                                                  \
    do {                                                                             \
        _tile_loadd(ta, a_rows + kc * 4, lda);                                       \
        _tile_loadd(tb, panel + kc * 64, 64);                                        \
        DP(0, ta, tb);                                                               \
        _tile_loadd(tb, panel + bstride + kc * 64, 64);                              \
        DP(1, ta, tb);                                                               \
        _tile_loadd(tb, panel + 2 * bstride + kc * 64, 64);                          \
        DP(2, ta, tb);                                                               \
        _tile_loadd(tb, panel + 3 * bstride + kc * 64, 64);                          \
        DP(3, ta, tb);                                                               \
    } while (0)

#define FASTRNN_AMX_SUMS(NAME, DP, START)                                             \
    static inline void NAME(const int8_t* a_rows, ptrdiff_t lda, const int8_t* panel,  \
                            ptrdiff_t bstride, ptrdiff_t units, const void* start,     \
                            void* sums) {                                             \
        ptrdiff_t kt = units % 16, kc;                                                \
        char* out = (char*)sums;                                                      \
        START(0, start);                                                              \
        START(1, start);                                                              \
        START(2, start);                                                              \
        START(3, start);                                                              \
        for (kc = 0; kc < units - kt; kc += 16)                                       \
            FASTRNN_AMX_STEP(DP, 4, 5);                                               \
        if (kt > 0)                                                                   \
            FASTRNN_AMX_STEP(DP, 6, 7);                                               \
        _tile_stored(0, out, 256);                                                    \
        _tile_stored(1, out + 64, 256);                                               \
        _tile_stored(2, out + 128, 256);                                              \
        _tile_stored(3, out + 192, 256);                                              \
    }

/* The sums' tiles at their start: zero (bfloat16), or every row the 16
 * int32 of block t at start (int8: the weights' column term, loaded with a
 * row stride of 0, so that no output adds it after the tiles) */
#define FASTRNN_AMX_ZERO(t, start) _tile_zero(t)
#define FASTRNN_AMX_ROW(t, start) _tile_loadd(t, (const char*)(start) + 64 * (t), 0)

/* The tiles of FASTRNN_AMX_SUMS for tiles of ``rows`` rows and a K tail of
 * kt k-units (0: none), configured (fastrnn_amx_config). */
static void fastrnn_amx_tiles(int rows, ptrdiff_t kt) {
    fastrnn_q_tilecfg cfg;
    int r;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (r = 0; r < 6; r++) {
        cfg.rows[r] = (uint8_t)(r == 5 ? 16 : rows);
        cfg.colsb[r] = 64;
    }
    if (kt > 0) {
        cfg.rows[6] = (uint8_t)rows;
        cfg.colsb[6] = (uint16_t)(kt * 4);
        cfg.rows[7] = (uint8_t)kt;
        cfg.colsb[7] = 64;
    }
    fastrnn_amx_config(&cfg);
}

FASTRNN_AMX_SUMS(fastrnn_q_amx_sums, _tile_dpbusd, FASTRNN_AMX_ROW)

/* The product (M >= 16 rows) as fastrnn_q_product, in tiles of 16 rows, the
 * last one ending at row M and emitting only the rows the others did not
 * (the same exact sums whatever the tile), so that no row is left to VNNI
 * and the weights are read once (int8 GRU B = 20, H = 800 at 1 thread:
 * 1.29x against the rows left on VNNI). */
static void fastrnn_q_product_amx(ptrdiff_t M, ptrdiff_t quads, const int8_t* a,
                                  ptrdiff_t lda, const int8_t* packed, const int32_t* comp,
                                  ptrdiff_t blocks, const fastrnn_q_out* o) {
    int32_t sums[16][64] __attribute__((aligned(64)));
    ptrdiff_t bstride = quads * 64, m0, t0, nb0, r;
    fastrnn_amx_tiles(16, quads % 16);
    /* column group by column group: each group's weights read once for all
     * the tiles (b64-h512 LSTM 1.05x) */
    for (nb0 = 0; nb0 < blocks; nb0 += FASTRNN_Q_NV) {
        const int8_t* panel = packed + nb0 * bstride;
        const int32_t* start = comp + nb0 * 16;
        for (m0 = 0; m0 < M; m0 += 16) {
            const int8_t* a_rows;
            t0 = m0 + 16 <= M ? m0 : M - 16;    /* the tile's first row */
            a_rows = a + t0 * lda;
            /* the tiles start from the weights' column term, as the VNNI
             * tiles' accumulators do (added to each output row instead, the
             * product took 1-7% longer: 32 x 128 by 128 x 128 0.94-0.99 ->
             * 0.92 us, 256 x 64 by 64 x 256 14.9 -> 14.8, one thread) */
            fastrnn_q_amx_sums(a_rows, lda, panel, bstride, quads, start, sums);
            for (r = m0 - t0; r < 16; r++)
                fastrnn_q_emit(o, t0 + r, nb0 * 16,
                               _mm512_load_si512((const void*)&sums[r][0]),
                               _mm512_load_si512((const void*)&sums[r][16]),
                               _mm512_load_si512((const void*)&sums[r][32]),
                               _mm512_load_si512((const void*)&sums[r][48]));
        }
    }
}
#else
static int fastrnn_q_amx_enable(void) { return 0; }
static inline void fastrnn_amx_release(void) {}
#endif

/* The product of A (M rows of quantized activations, lda bytes apart) and
 * W^T over W packed by fastrnn_q_pack (comp its column term), to ``o``.
 * All rows in tiles of 16 on AMX (where enabled and M >= 16), else in
 * tiles of FASTRNN_Q_BIG rows, then the rest (fastrnn_q_tiles_after); within
 * a tile, the columns in groups of FASTRNN_Q_NV blocks, so that a tile's
 * output rows (and the rows it adds: a step's input projection, 1 KB per
 * row at H = 64) are walked in order, which the hardware prefetches (column
 * groups outside: 0.9x the float32 kernel's time at B = 256, H = 64, the
 * adds' loads waiting on memory). Weights past L2 (FASTRNN_Q_GROUPS_OUTER_BYTES)
 * the other way round: each tile would stream all of them from L3. */
static void fastrnn_q_product(ptrdiff_t M, ptrdiff_t K, const int8_t* a, ptrdiff_t lda,
                              const int8_t* packed, const int32_t* comp, ptrdiff_t N,
                              const fastrnn_q_out* o) {
    ptrdiff_t quads = fastrnn_q_quads(K), blocks = fastrnn_q_blocks(N);
    ptrdiff_t bstride = quads * 64, nb0, m0 = 0, big_end = fastrnn_q_big_end(M);
#if defined(FASTRNN_Q_AMX)
    /* 16 rows or more on AMX, fewer on VNNI (the same sums); so is a product
     * of one column group over one tile's depth of k (K <= 64, N <= 64),
     * where the tiles' fixed costs (zeroing, the sums stored and read back)
     * outweigh their speed: RNN 1->50, two layers, B=32, T=50 at 1 thread
     * 0.241 -> 0.220 ms (min of 8 blocks; an RNN 64->64 B=32 the same) */
    if (fastrnn_q_amx_enabled && M >= 16 && (quads > 16 || blocks > FASTRNN_Q_NV)) {
        fastrnn_q_product_amx(M, quads, a, lda, packed, comp, blocks, o);
        return;
    }
#endif
    if (bstride * blocks > FASTRNN_Q_GROUPS_OUTER_BYTES && M > FASTRNN_Q_BIG) {
        /* weights beyond L2: column group by column group, each group's
         * panel fetched once from L3 for every tile of rows */
        for (nb0 = 0; nb0 < blocks; nb0 += FASTRNN_Q_NV) {
            const int8_t* panel = packed + nb0 * bstride;
            for (m0 = 0; m0 < big_end; m0 += FASTRNN_Q_BIG)
                fastrnn_q_tile_big(quads, a + m0 * lda, lda, panel, bstride, comp + nb0 * 16,
                                   o, m0, nb0 * 16);
            if (m0 < M)
                fastrnn_q_tiles_after(M - m0, quads, a + m0 * lda, lda, panel, bstride,
                                      comp + nb0 * 16, o, m0, nb0 * 16);
        }
        return;
    }
    for (; m0 < big_end; m0 += FASTRNN_Q_BIG)
        for (nb0 = 0; nb0 < blocks; nb0 += FASTRNN_Q_NV)
            fastrnn_q_tile_big(quads, a + m0 * lda, lda, packed + nb0 * bstride, bstride,
                               comp + nb0 * 16, o, m0, nb0 * 16);
    if (m0 < M)
        for (nb0 = 0; nb0 < blocks; nb0 += FASTRNN_Q_NV)
            fastrnn_q_tiles_after(M - m0, quads, a + m0 * lda, lda, packed + nb0 * bstride,
                                  bstride, comp + nb0 * 16, o, m0, nb0 * 16);
}

/* c (M rows ldc apart, fastrnn_q_blocks(N) * 16 int32 each) = the int32 sums. */
static void fastrnn_q_gemm(ptrdiff_t M, ptrdiff_t K, const int8_t* a, ptrdiff_t lda,
                           const int8_t* packed, const int32_t* comp, ptrdiff_t N,
                           int32_t* c, ptrdiff_t ldc) {
    fastrnn_q_out o;
    memset(&o, 0, sizeof o);
    o.c = c;
    o.ldc = ldc;
    o.cols = N;
    fastrnn_q_product(M, K, a, lda, packed, comp, N, &o);
}

/* y (M rows ldy apart, N columns) = add + the sums dequantized with the
 * row scales rs and the column scales cs (see fastrnn_q_out). */
static void fastrnn_q_gemm_dequant(ptrdiff_t M, ptrdiff_t K, const int8_t* a, ptrdiff_t lda,
                                   const int8_t* packed, const int32_t* comp, ptrdiff_t N,
                                   const float* rs, const float* cs, const float* add,
                                   ptrdiff_t ld_add, float* y, ptrdiff_t ldy) {
    fastrnn_q_out o;
    o.c = NULL;
    o.ldc = 0;
    o.rs = rs;
    o.cs = cs;
    o.add = add;
    o.ld_add = ld_add;
    o.y = y;
    o.ldy = ldy;
    o.cols = N;
    fastrnn_q_product(M, K, a, lda, packed, comp, N, &o);
}

/* The int8 multiply-add peak of this build's products, what the bench
 * judges them by: FASTRNN_Q_PEAK_CHAINS independent int32 accumulators,
 * each iteration one multiply-add step of the tiles' per accumulator (VNNI:
 * a vpdpbusd, 64 multiply-adds; AVX2: vpsignb, vpmaddubsw, vpmaddwd and
 * vpaddd, 32), nothing loaded or stored in the loop. ``iters`` iterations
 * do iters * FASTRNN_Q_PEAK_MACS multiply-adds (0 in the portable build:
 * it has no such instruction, nothing is measured); the sum goes to *sink
 * so that the loop stays. FASTRNN_HOLD (_portable.h), an empty asm (GCC,
 * Clang), tells the compiler an operand changed, so that no step is
 * hoisted out of the loop or shared between accumulators (MSVC has no such statement: its
 * AVX2 figure may be too high, a loop-invariant step hoisted). AMX's tiles
 * are not measured. */
#define FASTRNN_Q_PEAK_CHAINS 12
#if defined(__GNUC__)
#define FASTRNN_Q_UNROLL _Pragma("GCC unroll 12")
#else
#define FASTRNN_Q_UNROLL
#endif
#if defined(FASTRNN_Q_VNNI)
#define FASTRNN_Q_PEAK_MACS (FASTRNN_Q_PEAK_CHAINS * 64)
static void fastrnn_q_peak_loop(long long iters, int32_t* sink) {
    __m512i acc[FASTRNN_Q_PEAK_CHAINS];
    __m512i a = _mm512_set1_epi8(3), w = _mm512_set1_epi8(-2);
    int j;
    for (j = 0; j < FASTRNN_Q_PEAK_CHAINS; j++) acc[j] = _mm512_set1_epi32(j);
    for (long long i = 0; i < iters; i++) {
        FASTRNN_HOLD(a);
        FASTRNN_HOLD(w);
        FASTRNN_Q_UNROLL for (j = 0; j < FASTRNN_Q_PEAK_CHAINS; j++)
            acc[j] = _mm512_dpbusd_epi32(acc[j], a, w);
    }
    for (j = 1; j < FASTRNN_Q_PEAK_CHAINS; j++) acc[0] = _mm512_add_epi32(acc[0], acc[j]);
    *sink = _mm512_reduce_add_epi32(acc[0]);
}
#elif defined(FASTRNN_Q_AVX2)
#define FASTRNN_Q_PEAK_MACS (FASTRNN_Q_PEAK_CHAINS * 32)
static void fastrnn_q_peak_loop(long long iters, int32_t* sink) {
    __m256i acc[FASTRNN_Q_PEAK_CHAINS];
    __m256i mag = _mm256_set1_epi8(3), w = _mm256_set1_epi8(-2), b = _mm256_set1_epi8(5);
    const __m256i ones = _mm256_set1_epi16(1);
    int32_t total[8];
    int j;
    for (j = 0; j < FASTRNN_Q_PEAK_CHAINS; j++) acc[j] = _mm256_set1_epi32(j);
    for (long long i = 0; i < iters; i++) {
        FASTRNN_Q_UNROLL for (j = 0; j < FASTRNN_Q_PEAK_CHAINS; j++) {
            FASTRNN_HOLD(b);
            acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(
                _mm256_maddubs_epi16(mag, _mm256_sign_epi8(w, b)), ones));
        }
    }
    for (j = 1; j < FASTRNN_Q_PEAK_CHAINS; j++) acc[0] = _mm256_add_epi32(acc[0], acc[j]);
    _mm256_storeu_si256((__m256i*)total, acc[0]);
    *sink = total[0];
}
#else
#define FASTRNN_Q_PEAK_MACS 0
static void fastrnn_q_peak_loop(long long iters, int32_t* sink) {
    (void)iters;
    *sink = 0;
}
#endif

/* ---- bfloat16 --------------------------------------------------------------
 *
 * Weights rounded to bfloat16 once (round to nearest even; float32's
 * denormals to signed zero), activations at every use, products summed in
 * float32. Layout as int8's with pairs of k instead of quads: per block of
 * 16 columns and pair of k, 64 bytes, column l's two bf16 at bytes 4l..4l+3
 * (k even first). An activation row is pairs * 4 bytes. Each output is one
 * chain over the pairs, from +0: s = s + a[2p+1] * w[2p+1], then s = s +
 * a[2p] * w[2p], each rounded to float32 (the product of two bf16 is exact
 * in float32). That is what AVX-512 BF16's vdpbf16ps computes (checked on
 * this project's Zen 4: bit for bit against this order, not against a
 * single rounding nor the even product first); the other builds compute it
 * with float32 multiplies and adds, so every build gives the same bits but
 * AMX's (fastrnn_b_product_amx: within float32 rounding). */

static inline ptrdiff_t fastrnn_b_pairs(ptrdiff_t K) { return (K + 1) / 2; }

static inline uint16_t fastrnn_b_round(uint32_t bits) {
    if ((bits & 0x7f800000u) == 0)
        bits &= 0x80000000u;                      /* denormals to signed zero */
    else if ((bits & 0x7f800000u) != 0x7f800000u)
        bits += 0x7fffu + ((bits >> 16) & 1u);    /* round to nearest even */
    return (uint16_t)(bits >> 16);
}

/* Pack W (N rows ldw apart, K bf16 bit patterns each) into out
 * (blocks * pairs * 64 bytes). */
static void fastrnn_b_pack(const uint16_t* w, ptrdiff_t ldw, ptrdiff_t K, ptrdiff_t N,
                           uint16_t* out) {
    ptrdiff_t pairs = fastrnn_b_pairs(K), blocks = fastrnn_q_blocks(N);
    ptrdiff_t nb, kp, l, j;
    for (nb = 0; nb < blocks; nb++)
        for (kp = 0; kp < pairs; kp++)
            for (l = 0; l < 16; l++)
                for (j = 0; j < 2; j++) {
                    ptrdiff_t col = nb * 16 + l, k = kp * 2 + j;
                    out[((nb * pairs + kp) * 16 + l) * 2 + j] =
                        (col < N && k < K) ? w[col * ldw + k] : 0;
                }
}

/* The inverse of fastrnn_b_pack: W (N rows ldw apart, K bf16 bit patterns
 * each) from the packed panels. */
static void fastrnn_b_unpack(const uint16_t* packed, ptrdiff_t K, ptrdiff_t N, uint16_t* w,
                             ptrdiff_t ldw) {
    ptrdiff_t pairs = fastrnn_b_pairs(K), n, k;
    for (n = 0; n < N; n++)
        for (k = 0; k < K; k++)
            w[n * ldw + k] = packed[(((n / 16) * pairs + k / 2) * 16 + n % 16) * 2 + k % 2];
}

/* |x| from which float32 rounds to bfloat16's inf (bits: halfway between
 * bfloat16's largest finite value, 3.3895e38, and inf; ties to even go up) */
#define FASTRNN_B_INF_FROM 0x7f7f8000u

/* One activation row x (K floats) to bf16 in q (pairs * 4 bytes); returns
 * 1, or -1 if x holds NaN, inf or a value that rounds to inf (the callers
 * refuse the caller's such rows: float32 would have kept them finite). */
static inline float fastrnn_b_row(const float* x, ptrdiff_t K, int8_t* q,
                                  const float* next) {
    ptrdiff_t k, padded = fastrnn_b_pairs(K) * 2;
    uint32_t top = 0;
#if defined(FASTRNN_ROW_SIMD)
    /* fastrnn_b_round, 16 at a time */
    const __m512i abs_bits = _mm512_set1_epi32(0x7fffffff);
    const __m512i exponent = _mm512_set1_epi32(0x7f800000);
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
    const __m512i half = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1);
    __m512i tops = _mm512_setzero_si512();
    for (k = 0; k < K; k += 16) {
        __mmask16 m = fastrnn_row_mask(K - k);
        __m512i bits;
        if (next != NULL) _mm_prefetch((const char*)(next + k), _MM_HINT_T0);
        bits = _mm512_maskz_loadu_epi32(m, x + k);
        __m512i e = _mm512_and_si512(bits, exponent);
        __mmask16 tiny = _mm512_cmpeq_epi32_mask(e, _mm512_setzero_si512());
        __mmask16 finite = _mm512_cmpneq_epi32_mask(e, exponent);
        __m512i rounded = _mm512_add_epi32(
            bits, _mm512_add_epi32(half, _mm512_and_si512(_mm512_srli_epi32(bits, 16), one)));
        tops = _mm512_max_epu32(tops, _mm512_and_si512(bits, abs_bits));
        bits = _mm512_mask_mov_epi32(bits, finite & (__mmask16)~tiny, rounded);
        bits = _mm512_mask_and_epi32(bits, tiny, bits, sign);
        _mm256_mask_storeu_epi16(q + 2 * k, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
    }
    top = (uint32_t)_mm512_reduce_max_epu32(tops);
    k = K;
#else
    (void)next;
    for (k = 0; k < K; k++) {
        uint32_t bits;
        uint16_t b;
        memcpy(&bits, x + k, 4);
        top = (bits & 0x7fffffffu) > top ? (bits & 0x7fffffffu) : top;
        b = fastrnn_b_round(bits);
        memcpy(q + 2 * k, &b, 2);
    }
#endif
    for (; k < padded; k++) {
        uint16_t zero = 0;
        memcpy(q + 2 * k, &zero, 2);
    }
    return top >= FASTRNN_B_INF_FROM ? -1.0f : 1.0f;
}

#define FASTRNN_B_ARGS ptrdiff_t pairs, const int8_t* a, ptrdiff_t lda, const int8_t* panel, \
    ptrdiff_t bstride, const fastrnn_q_out* o, ptrdiff_t m0, ptrdiff_t col0

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define FASTRNN_B_ISA "avx512bf16"
static inline void fastrnn_b_emit(const fastrnn_q_out* o, ptrdiff_t m, ptrdiff_t col0,
                                  __m512 v0, __m512 v1, __m512 v2, __m512 v3) {
    __m512 v[4];
    ptrdiff_t k, left = o->cols - col0;
    float* y = o->y + m * o->ldy + col0;
    const float* add = o->add == NULL ? NULL : o->add + m * o->ld_add + col0;
    v[0] = v0; v[1] = v1; v[2] = v2; v[3] = v3;
    for (k = 0; k < 4 && left > 16 * k; k++) {
        __mmask16 mask = fastrnn_row_mask(left - 16 * k);
        __m512 p = v[k];
        if (add != NULL)
            p = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, add + 16 * k), p);
        _mm512_mask_storeu_ps(y + 16 * k, mask, p);
    }
}
#define B_LOADW(v) __m512bh w##v = (__m512bh)_mm512_loadu_si512(                             \
    (const void*)(panel + (v) * bstride + kp * 64))
#define B_INIT(r) __m512 c##r##0 = zero, c##r##1 = zero, c##r##2 = zero, c##r##3 = zero
#define B_ROW(r) b = (__m512bh)_mm512_set1_epi32(fastrnn_q_load4(a + (r) * lda + kp * 4));   \
    c##r##0 = _mm512_dpbf16_ps(c##r##0, b, w0); c##r##1 = _mm512_dpbf16_ps(c##r##1, b, w1);  \
    c##r##2 = _mm512_dpbf16_ps(c##r##2, b, w2); c##r##3 = _mm512_dpbf16_ps(c##r##3, b, w3)
#define B_STORE(r) fastrnn_b_emit(o, m0 + (r), col0, c##r##0, c##r##1, c##r##2, c##r##3)
#define B_START const __m512 zero = _mm512_setzero_ps(); __m512bh b
#define B_LOOP_ROWS(ROWS) ptrdiff_t kp; B_START; ROWS(B_INIT);                              \
    for (kp = 0; kp < pairs; kp++) { B_LOADW(0); B_LOADW(1); B_LOADW(2); B_LOADW(3);          \
                                     ROWS(B_ROW); }                                          \
    ROWS(B_STORE)
#define B_ROWS6(X) X(0); X(1); X(2); X(3); X(4); X(5)
#define B_ROWS2(X) X(0); X(1)
#define B_ROWS1(X) X(0)
static void fastrnn_b_tile6(FASTRNN_B_ARGS) { B_LOOP_ROWS(B_ROWS6); }
static void fastrnn_b_tile2(FASTRNN_B_ARGS) { B_LOOP_ROWS(B_ROWS2); }
static void fastrnn_b_tile1(FASTRNN_B_ARGS) { B_LOOP_ROWS(B_ROWS1); }
#define FASTRNN_B_BIG 6
#define fastrnn_b_tile_big fastrnn_b_tile6
#define FASTRNN_B_NV 4

#elif defined(__AVX2__)
#define FASTRNN_B_ISA "emulated (avx2)"
/* per block two ymm of 8 columns; each 32-bit lane holds a pair */
static inline void fastrnn_b_emit(const fastrnn_q_out* o, ptrdiff_t m, ptrdiff_t col0,
                                  __m256 v0, __m256 v1, __m256 v2, __m256 v3) {
    __m256 v[4];
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    ptrdiff_t k, left = o->cols - col0;
    float* y = o->y + m * o->ldy + col0;
    const float* add = o->add == NULL ? NULL : o->add + m * o->ld_add + col0;
    v[0] = v0; v[1] = v1; v[2] = v2; v[3] = v3;
    for (k = 0; k < 4 && left > 8 * k; k++)
        fastrnn_q_put8(y + 8 * k, add == NULL ? NULL : add + 8 * k, v[k], left - 8 * k, lane);
}
#define B_LOADW(v) __m256i wp##v = _mm256_loadu_si256(                                      \
    (const __m256i*)(panel + ((v) / 2) * bstride + kp * 64 + ((v) % 2) * 32));              \
    __m256 we##v = _mm256_castsi256_ps(_mm256_slli_epi32(wp##v, 16));                         \
    __m256 wo##v = _mm256_castsi256_ps(_mm256_and_si256(wp##v, high))
#define B_MAC(acc, v) acc = _mm256_add_ps(acc, _mm256_mul_ps(ao, wo##v));                      \
    acc = _mm256_add_ps(acc, _mm256_mul_ps(ae, we##v))
#define B_INIT(r) __m256 c##r##0 = zero, c##r##1 = zero, c##r##2 = zero, c##r##3 = zero
#define B_ROW(r) b = _mm256_set1_epi32(fastrnn_q_load4(a + (r) * lda + kp * 4));             \
    ae = _mm256_castsi256_ps(_mm256_slli_epi32(b, 16));                                      \
    ao = _mm256_castsi256_ps(_mm256_and_si256(b, high));                                     \
    B_MAC(c##r##0, 0); B_MAC(c##r##1, 1); B_MAC(c##r##2, 2); B_MAC(c##r##3, 3)
#define B_STORE(r) fastrnn_b_emit(o, m0 + (r), col0, c##r##0, c##r##1, c##r##2, c##r##3)
#define B_START const __m256 zero = _mm256_setzero_ps();                                     \
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u); __m256i b; __m256 ae, ao
#define B_LOOP_ROWS(ROWS) ptrdiff_t kp; B_START; ROWS(B_INIT);                              \
    for (kp = 0; kp < pairs; kp++) { B_LOADW(0); B_LOADW(1); B_LOADW(2); B_LOADW(3);          \
                                     ROWS(B_ROW); }                                          \
    ROWS(B_STORE)
#define B_ROWS2(X) X(0); X(1)
#define B_ROWS1(X) X(0)
static void fastrnn_b_tile2(FASTRNN_B_ARGS) { B_LOOP_ROWS(B_ROWS2); }
static void fastrnn_b_tile1(FASTRNN_B_ARGS) { B_LOOP_ROWS(B_ROWS1); }
#define FASTRNN_B_BIG 2
#define fastrnn_b_tile_big fastrnn_b_tile2
#define FASTRNN_B_NV 2          /* blocks per tile (a divisor of FASTRNN_Q_NV) */

#else
#define FASTRNN_B_ISA "emulated (portable)"
static inline float fastrnn_b_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
static void fastrnn_b_tile1(FASTRNN_B_ARGS) {
    float acc[16];
    ptrdiff_t kp, col;
    int v, l;
    (void)lda;
    for (v = 0; v < FASTRNN_Q_NV; v++) {
        const int8_t* p = panel + v * bstride;
        for (l = 0; l < 16; l++)
            acc[l] = 0.0f;
        for (kp = 0; kp < pairs; kp++) {
            uint16_t ap[2], wp[32];
            float a0, a1;
            memcpy(ap, a + kp * 4, 4);
            memcpy(wp, p + kp * 64, 64);
            a0 = fastrnn_b_float(ap[0]);
            a1 = fastrnn_b_float(ap[1]);
            for (l = 0; l < 16; l++) {
                acc[l] = acc[l] + a1 * fastrnn_b_float(wp[2 * l + 1]);
                acc[l] = acc[l] + a0 * fastrnn_b_float(wp[2 * l]);
            }
        }
        col = col0 + 16 * v;
        {
            float* y = o->y + m0 * o->ldy;
            const float* add = o->add == NULL ? NULL : o->add + m0 * o->ld_add;
            for (l = 0; l < 16 && col + l < o->cols; l++)
                y[col + l] = add == NULL ? acc[l] : add[col + l] + acc[l];
        }
    }
}
static void fastrnn_b_tile2(FASTRNN_B_ARGS) {
    fastrnn_b_tile1(pairs, a, lda, panel, bstride, o, m0, col0);
    fastrnn_b_tile1(pairs, a + lda, lda, panel, bstride, o, m0 + 1, col0);
}
#define FASTRNN_B_BIG 2
#define fastrnn_b_tile_big fastrnn_b_tile2
#define FASTRNN_B_NV FASTRNN_Q_NV
#endif

#if defined(FASTRNN_Q_AMX) && defined(__AMX_BF16__)
#define FASTRNN_B_AMX 1
#undef FASTRNN_B_ISA
#define FASTRNN_B_ISA "amx-bf16"
/* AMX's TDPBF16PS (16 rows x 16 pairs of bf16 times 16 pairs x 16 columns
 * into 16 x 16 float32; measured here 1.0 T multiply-adds a second over 16
 * rows, 76 G over one, against vdpbf16ps' 60 G) sums each output in its own
 * order, which is not vdpbf16ps' chain (it matches neither pair order nor a
 * single rounding): its results differ from the other builds' in the last
 * bits, within float32 rounding of the exact sum (measured: at most 0.9
 * units of 2^-24 of sum |a w| on normal values, the chain up to 2.7; 7.3
 * over 32 products of magnitudes spread over 2^+-10, the chain 8.6;
 * tests/test_quantize.py bounds it by K units). So that a row's result
 * never depends on the other rows of a call, every row runs on the tiles
 * (fastrnn_b_product_amx). The packed panels are B tiles (a row per pair
 * of k), the bf16 activation rows A tiles. */
static int fastrnn_b_amx_enabled = 0;

/* 1 if AMX-BF16 is there and the tiles granted (fastrnn_q_amx_enable) */
static int fastrnn_b_amx_enable(void) {
    unsigned int eax, ebx, ecx, edx;
    if (fastrnn_b_amx_enabled)
        return 1;
    if (!fastrnn_q_amx_enable() || !__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)
            || !(edx & (1u << 22)))
        return 0;
    fastrnn_b_amx_enabled = 1;
    return 1;
}

FASTRNN_AMX_SUMS(fastrnn_b_amx_sums, _tile_dpbf16ps, FASTRNN_AMX_ZERO)

/* The whole product of fastrnn_b_gemm (M >= 1) on the tiles, as
 * fastrnn_q_product_amx's (column group by column group, each group's
 * weights read once for all the tiles: b64-h512 LSTM 1.5x faster than row
 * tiles outside; the last tile of 16 ending at row M: GRU B = 20, H = 800
 * 1.43x against a second pass over the rows left), and below 16 rows one
 * tile of M rows. */
static void fastrnn_b_product_amx(ptrdiff_t M, ptrdiff_t pairs, const int8_t* a,
                                  ptrdiff_t lda, const int8_t* packed, ptrdiff_t blocks,
                                  const fastrnn_q_out* o) {
    float sums[16][64] __attribute__((aligned(64)));
    ptrdiff_t bstride = pairs * 64, rows = M < 16 ? M : 16, m0, t0, nb0, r;
    fastrnn_amx_tiles((int)rows, pairs % 16);
    for (nb0 = 0; nb0 < blocks; nb0 += FASTRNN_Q_NV)
        for (m0 = 0; m0 < M; m0 += rows) {
            t0 = m0 + rows <= M ? m0 : M - rows;    /* the tile's first row */
            fastrnn_b_amx_sums(a + t0 * lda, lda, packed + nb0 * bstride, bstride, pairs,
                               NULL, sums);
            for (r = m0 - t0; r < rows; r++)
                fastrnn_b_emit(o, t0 + r, nb0 * 16, _mm512_load_ps(&sums[r][0]),
                               _mm512_load_ps(&sums[r][16]), _mm512_load_ps(&sums[r][32]),
                               _mm512_load_ps(&sums[r][48]));
        }
}
#else
static int fastrnn_b_amx_enable(void) { return 0; }
#endif

/* y (M rows ldy apart, N columns) = add + A . W^T over W packed by
 * fastrnn_b_pack, A's rows of bf16 (lda bytes apart). */
static void fastrnn_b_gemm(ptrdiff_t M, ptrdiff_t K, const int8_t* a, ptrdiff_t lda,
                           const int8_t* packed, ptrdiff_t N, const float* add,
                           ptrdiff_t ld_add, float* y, ptrdiff_t ldy) {
    ptrdiff_t pairs = fastrnn_b_pairs(K), blocks = fastrnn_q_blocks(N);
    ptrdiff_t bstride = pairs * 64, nb0, m0;
    fastrnn_q_out o;
    memset(&o, 0, sizeof o);
    o.add = add;
    o.ld_add = ld_add;
    o.y = y;
    o.ldy = ldy;
    o.cols = N;
#if defined(FASTRNN_B_AMX)
    if (fastrnn_b_amx_enabled) {
        if (M > 0)
            fastrnn_b_product_amx(M, pairs, a, lda, packed, blocks, &o);
        return;
    }
#endif
    for (m0 = 0; m0 + FASTRNN_B_BIG <= M; m0 += FASTRNN_B_BIG)
        for (nb0 = 0; nb0 < blocks; nb0 += FASTRNN_B_NV)
            fastrnn_b_tile_big(pairs, a + m0 * lda, lda, packed + nb0 * bstride, bstride, &o,
                               m0, nb0 * 16);
    for (; m0 + 2 <= M; m0 += 2)
        for (nb0 = 0; nb0 < blocks; nb0 += FASTRNN_B_NV)
            fastrnn_b_tile2(pairs, a + m0 * lda, lda, packed + nb0 * bstride, bstride, &o, m0,
                            nb0 * 16);
    if (m0 < M)
        for (nb0 = 0; nb0 < blocks; nb0 += FASTRNN_B_NV)
            fastrnn_b_tile1(pairs, a + m0 * lda, lda, packed + nb0 * bstride, bstride, &o, m0,
                            nb0 * 16);
}

#endif
