/* The float32 activations' clamp bound (fastrnn/_gates.pxd.tp), read through
 * a volatile once per batch row rather than written as a constant. With the
 * constant, GCC folds e^88 through the polynomial and turns each clamp into
 * compares and blends around the whole computation (nine vector instructions
 * for sigmoid's two clamps); with a value it cannot see, each clamp is one
 * vminps or vmaxps. Same values either way; measured on a loop of float32
 * sigmoids, 1.17x faster with AVX-512 and 1.49x with AVX2. */
#ifndef FASTRNN_ACTIVATIONS_H
#define FASTRNN_ACTIVATIONS_H

#include <stddef.h>

/* The quantized kernels' sigmoid and tanh are rational functions
 * (fastrnn/_gates.pxd.tp says why): setup.py defines this to 1 for them. */
#ifndef FASTRNN_RATIONAL_ACTIVATIONS
#define FASTRNN_RATIONAL_ACTIVATIONS 0
#endif

#define FASTRNN_EXP_MAX 88.0f   /* e^88 is finite in float32 */
static volatile const float fastrnn_exp_max_ = FASTRNN_EXP_MAX;

static inline float fastrnn_exp_max(void) { return fastrnn_exp_max_; }

/* The multiply-adds of the float32 exp polynomials (fastrnn/_gates.pxd.tp).
 * The float kernels write them a * b + c and let the compiler fuse them
 * (FMA builds) or not. The quantized kernels (FASTRNN_EXPLICIT_FMA, set by
 * setup.py), compiled without contraction so that every build computes
 * the same float32 operations, fuse exactly these, by fmaf, where the CPU
 * has FMA and GCC or Clang build: the AVX2, AVX-512 and AArch64 builds
 * then give the same bits (the x86-64 portable build, and MSVC's, compute
 * a * b + c in two roundings instead). Their gate pass: ~22% fewer
 * cycles (an LSTM row at H = 128, AVX-512, 2.08 -> 1.62 ns a unit). */
#if defined(FASTRNN_EXPLICIT_FMA) && !defined(_MSC_VER) \
    && (defined(__FMA__) || defined(__aarch64__))
#include <math.h>
#define FASTRNN_FUSED_ACTIVATIONS 1
#define fastrnn_fmaf(a, b, c) fmaf((a), (b), (c))
#else
#define FASTRNN_FUSED_ACTIVATIONS 0
#define fastrnn_fmaf(a, b, c) ((a) * (b) + (c))
#endif


/* The last n < 8 values of a float32 row in and out of a row of 8
 * (fastrnn/_gates.pxd.tp: the rows' tails). In: the n values, the other
 * lanes 0; out: the first n lanes. Masked vector loads and stores where
 * the build has them: they touch no memory past the n values, and cost a
 * few instructions where a memcpy call of a variable length cost tens of
 * cycles (eleven of them made an LSTM row's tail ~200 cycles). */
#define FASTRNN_TAIL_LANES 8
#define FASTRNN_TAIL_MIN 3
#if defined(__AVX512F__) && defined(__AVX512VL__)
#include <immintrin.h>
static inline void fastrnn_tail_in(float* dst, const float* src, ptrdiff_t n) {
    _mm256_storeu_ps(dst, _mm256_maskz_loadu_ps((__mmask8)((1u << n) - 1u), src));
}
static inline void fastrnn_tail_out(float* dst, const float* src, ptrdiff_t n) {
    _mm256_mask_storeu_ps(dst, (__mmask8)((1u << n) - 1u), _mm256_loadu_ps(src));
}
#elif defined(__AVX2__)
#include <immintrin.h>
/* all-ones in the lanes below n */
static inline __m256i fastrnn_tail_mask(ptrdiff_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline void fastrnn_tail_in(float* dst, const float* src, ptrdiff_t n) {
    _mm256_storeu_ps(dst, _mm256_maskload_ps(src, fastrnn_tail_mask(n)));
}
static inline void fastrnn_tail_out(float* dst, const float* src, ptrdiff_t n) {
    _mm256_maskstore_ps(dst, fastrnn_tail_mask(n), _mm256_loadu_ps(src));
}
#else
static inline void fastrnn_tail_in(float* dst, const float* src, ptrdiff_t n) {
    for (ptrdiff_t i = 0; i < FASTRNN_TAIL_LANES; i++) dst[i] = i < n ? src[i] : 0.0f;
}
static inline void fastrnn_tail_out(float* dst, const float* src, ptrdiff_t n) {
    for (ptrdiff_t i = 0; i < n; i++) dst[i] = src[i];
}
#endif

#endif
