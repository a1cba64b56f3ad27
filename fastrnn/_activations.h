/* The float32 activations' clamp bound (fastrnn/_gates.pxd.tp), read through
 * a volatile once per batch row rather than written as a constant. With the
 * constant, GCC folds e^88 through the polynomial and turns each clamp into
 * compares and blends around the whole computation (nine vector instructions
 * for sigmoid's two clamps); with a value it cannot see, each clamp is one
 * vminps or vmaxps. Same values either way; measured on a loop of float32
 * sigmoids, 1.17x faster with AVX-512 and 1.49x with AVX2. */
#ifndef FASTRNN_ACTIVATIONS_H
#define FASTRNN_ACTIVATIONS_H

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


#endif
