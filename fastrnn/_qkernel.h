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
 *
 * Layout. A weight matrix W (N output rows, K inputs; PyTorch's layout) is
 * packed in blocks of 16 output columns; in each block, for each quad of 4
 * consecutive k, 64 bytes: column l's 4 weights at bytes 4l..4l+3. K is
 * padded to quads and N to blocks with zero weights. An activation row is
 * quads * 4 bytes (padding: the quantized zero). The int32 results have
 * blocks * 16 columns (the padding columns get 0).
 *
 * Quantizing an activation row x (K floats): amax = max |x_k|; a row with
 * amax below FLT_MIN (zero, or denormal) quantizes to zeros with scale 0;
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

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define FASTRNN_Q_VNNI 1
#include <immintrin.h>
#define FASTRNN_Q_ISA "avx512vnni"
#define FASTRNN_Q_OFFSET 128
#define FASTRNN_Q_MR 6
#define FASTRNN_Q_NV 4
#elif defined(__AVX2__)
#define FASTRNN_Q_AVX2 1
#include <immintrin.h>
#define FASTRNN_Q_ISA "avx2"
#define FASTRNN_Q_OFFSET 0
#if defined(__AVX512VL__)
#define FASTRNN_Q_MR 4          /* 32 vector registers: more rows per tile */
#else
#define FASTRNN_Q_MR 2
#endif
#define FASTRNN_Q_NV 2
#else
#define FASTRNN_Q_ISA "portable"
#define FASTRNN_Q_OFFSET 0
#define FASTRNN_Q_MR 4
#define FASTRNN_Q_NV 2
#endif

#if defined(_MSC_VER) && !defined(__clang__)
#define FASTRNN_Q_INLINE static __forceinline
#else
#define FASTRNN_Q_INLINE static inline __attribute__((always_inline))
#endif

/* the largest K whose sums cannot overflow int32 in any build (VNNI's
 * offset sums reach 255 * 127 * K) */
#define FASTRNN_Q_MAX_K 65536

static inline ptrdiff_t fastrnn_q_quads(ptrdiff_t K) { return (K + 3) / 4; }
static inline ptrdiff_t fastrnn_q_blocks(ptrdiff_t N) { return (N + 15) / 16; }
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

/* Quantize one row x (K floats) into q (quads * 4 bytes, the build's
 * format); returns its scale. */
static inline float fastrnn_q_row(const float* x, ptrdiff_t K, int8_t* q) {
    ptrdiff_t k, padded = fastrnn_q_quads(K) * 4;
    float amax = 0.0f, inv, v;
    for (k = 0; k < K; k++) {
        float a = x[k] < 0.0f ? -x[k] : x[k];
        amax = a > amax ? a : amax;
    }
    if (!(amax >= FLT_MIN)) {
        memset(q, FASTRNN_Q_OFFSET, (size_t)padded);
        return 0.0f;
    }
    inv = 127.0f / amax;
    for (k = 0; k < K; k++) {
        v = x[k] * inv;
        v = (v + 12582912.0f) - 12582912.0f;   /* round half to even */
        v = v > 127.0f ? 127.0f : v;
        v = v < -127.0f ? -127.0f : v;
        q[k] = (int8_t)(uint8_t)((int)v + FASTRNN_Q_OFFSET);
    }
    for (; k < padded; k++)
        q[k] = (int8_t)(uint8_t)FASTRNN_Q_OFFSET;
    return amax / 127.0f;
}

/* One tile: rows [0, mr) of a (lda bytes apart) times nv blocks of the
 * packed panel (bstride bytes from one block to the next) into c (int32,
 * ldc apart; 16 columns per block). */
#if defined(FASTRNN_Q_VNNI)
FASTRNN_Q_INLINE void fastrnn_q_tile(const int mr, const int nv, ptrdiff_t quads,
                                     const int8_t* a, ptrdiff_t lda, const int8_t* panel,
                                     ptrdiff_t bstride, const int32_t* comp, int32_t* c,
                                     ptrdiff_t ldc) {
    __m512i acc[FASTRNN_Q_MR][FASTRNN_Q_NV];
    __m512i w[FASTRNN_Q_NV];
    ptrdiff_t kq;
    int i, v;
    for (v = 0; v < nv; v++) {
        __m512i start = _mm512_loadu_si512((const void*)(comp + 16 * v));
        for (i = 0; i < mr; i++)
            acc[i][v] = start;
    }
    for (kq = 0; kq < quads; kq++) {
        for (v = 0; v < nv; v++)
            w[v] = _mm512_loadu_si512((const void*)(panel + v * bstride + kq * 64));
        for (i = 0; i < mr; i++) {
            int32_t quad;
            memcpy(&quad, a + i * lda + kq * 4, 4);
            __m512i ab = _mm512_set1_epi32(quad);
            for (v = 0; v < nv; v++)
                acc[i][v] = _mm512_dpbusd_epi32(acc[i][v], ab, w[v]);
        }
    }
    for (i = 0; i < mr; i++)
        for (v = 0; v < nv; v++)
            _mm512_storeu_si512((void*)(c + i * ldc + 16 * v), acc[i][v]);
}
#elif defined(FASTRNN_Q_AVX2)
FASTRNN_Q_INLINE void fastrnn_q_tile(const int mr, const int nv, ptrdiff_t quads,
                                     const int8_t* a, ptrdiff_t lda, const int8_t* panel,
                                     ptrdiff_t bstride, const int32_t* comp, int32_t* c,
                                     ptrdiff_t ldc) {
    __m256i acc[FASTRNN_Q_MR][2 * FASTRNN_Q_NV];
    __m256i w[2 * FASTRNN_Q_NV];
    const __m256i ones = _mm256_set1_epi16(1);
    ptrdiff_t kq;
    int i, u;
    (void)comp;
    for (i = 0; i < mr; i++)
        for (u = 0; u < 2 * nv; u++)
            acc[i][u] = _mm256_setzero_si256();
    for (kq = 0; kq < quads; kq++) {
        for (u = 0; u < 2 * nv; u++)
            w[u] = _mm256_loadu_si256((const __m256i*)(panel + (u / 2) * bstride + kq * 64
                                                       + (u % 2) * 32));
        for (i = 0; i < mr; i++) {
            int32_t quad;
            memcpy(&quad, a + i * lda + kq * 4, 4);
            __m256i ab = _mm256_set1_epi32(quad);
            __m256i mag = _mm256_abs_epi8(ab);
            for (u = 0; u < 2 * nv; u++) {
                __m256i pairs = _mm256_maddubs_epi16(mag, _mm256_sign_epi8(w[u], ab));
                acc[i][u] = _mm256_add_epi32(acc[i][u], _mm256_madd_epi16(pairs, ones));
            }
        }
    }
    for (i = 0; i < mr; i++)
        for (u = 0; u < 2 * nv; u++)
            _mm256_storeu_si256((__m256i*)(c + i * ldc + 8 * u), acc[i][u]);
}
#else
FASTRNN_Q_INLINE void fastrnn_q_tile(const int mr, const int nv, ptrdiff_t quads,
                                     const int8_t* a, ptrdiff_t lda, const int8_t* panel,
                                     ptrdiff_t bstride, const int32_t* comp, int32_t* c,
                                     ptrdiff_t ldc) {
    int32_t acc[16];
    ptrdiff_t kq;
    int i, v, l, j;
    (void)comp;
    for (i = 0; i < mr; i++) {
        for (v = 0; v < nv; v++) {
            const int8_t* p = panel + v * bstride;
            for (l = 0; l < 16; l++)
                acc[l] = 0;
            for (kq = 0; kq < quads; kq++) {
                const int8_t* ak = a + i * lda + kq * 4;
                const int8_t* pk = p + kq * 64;
                for (l = 0; l < 16; l++)
                    for (j = 0; j < 4; j++)
                        acc[l] += (int32_t)ak[j] * (int32_t)pk[l * 4 + j];
            }
            for (l = 0; l < 16; l++)
                c[i * ldc + 16 * v + l] = acc[l];
        }
    }
}
#endif

/* One tile size per call (constant mr, nv: the accumulators stay in
 * registers). */
#define FASTRNN_Q_TILE_NV(mr)                                                        \
    switch (nv) {                                                                    \
    case 1: fastrnn_q_tile(mr, 1, quads, a, lda, panel, bstride, comp, c, ldc); break; \
    case 2: fastrnn_q_tile(mr, 2, quads, a, lda, panel, bstride, comp, c, ldc); break; \
    case 3: if (FASTRNN_Q_NV >= 3) fastrnn_q_tile(mr, 3 <= FASTRNN_Q_NV ? 3 : 1, quads, a, lda, panel, bstride, comp, c, ldc); break; \
    default: if (FASTRNN_Q_NV >= 4) fastrnn_q_tile(mr, 4 <= FASTRNN_Q_NV ? 4 : 1, quads, a, lda, panel, bstride, comp, c, ldc); break; \
    }

static void fastrnn_q_tile_any(int mr, int nv, ptrdiff_t quads, const int8_t* a,
                               ptrdiff_t lda, const int8_t* panel, ptrdiff_t bstride,
                               const int32_t* comp, int32_t* c, ptrdiff_t ldc) {
    switch (mr) {
    case 1: FASTRNN_Q_TILE_NV(1) break;
    case 2: FASTRNN_Q_TILE_NV(2 <= FASTRNN_Q_MR ? 2 : 1) break;
    case 3: FASTRNN_Q_TILE_NV(3 <= FASTRNN_Q_MR ? 3 : 1) break;
    case 4: FASTRNN_Q_TILE_NV(4 <= FASTRNN_Q_MR ? 4 : 1) break;
    case 5: FASTRNN_Q_TILE_NV(5 <= FASTRNN_Q_MR ? 5 : 1) break;
    default: FASTRNN_Q_TILE_NV(6 <= FASTRNN_Q_MR ? 6 : 1) break;
    }
}

/* c (M rows ldc apart, blocks * 16 int32 each) = A (M rows of quantized
 * activations, lda bytes apart) . W^T over W packed by fastrnn_q_pack
 * (comp its column term). Columns in groups of FASTRNN_Q_NV blocks, rows
 * in tiles of FASTRNN_Q_MR. */
static void fastrnn_q_gemm(ptrdiff_t M, ptrdiff_t K, const int8_t* a, ptrdiff_t lda,
                           const int8_t* packed, const int32_t* comp, ptrdiff_t N,
                           int32_t* c, ptrdiff_t ldc) {
    ptrdiff_t quads = fastrnn_q_quads(K), blocks = fastrnn_q_blocks(N);
    ptrdiff_t bstride = quads * 64, nb0, m0;
    for (nb0 = 0; nb0 < blocks; nb0 += FASTRNN_Q_NV) {
        int nv = (int)(blocks - nb0 < FASTRNN_Q_NV ? blocks - nb0 : FASTRNN_Q_NV);
        for (m0 = 0; m0 < M; m0 += FASTRNN_Q_MR) {
            int mr = (int)(M - m0 < FASTRNN_Q_MR ? M - m0 : FASTRNN_Q_MR);
            fastrnn_q_tile_any(mr, nv, quads, a + m0 * lda, lda, packed + nb0 * bstride,
                               bstride, comp + nb0 * 16, c + m0 * ldc + nb0 * 16, ldc);
        }
    }
}

#endif
