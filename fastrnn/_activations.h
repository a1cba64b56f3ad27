/* The float32 activations' clamp bound (fastrnn/_gates.pxd.tp), read through
 * a volatile once per batch row rather than written as a constant. With the
 * constant, GCC folds e^88 through the polynomial and turns each clamp into
 * compares and blends around the whole computation (nine vector instructions
 * for sigmoid's two clamps); with a value it cannot see, each clamp is one
 * vminps or vmaxps. Same values either way; measured on a loop of float32
 * sigmoids, 1.17x faster with AVX-512 and 1.49x with AVX2. */
#ifndef FASTRNN_ACTIVATIONS_H
#define FASTRNN_ACTIVATIONS_H

#define FASTRNN_EXP_MAX 88.0f   /* e^88 is finite in float32 */
static volatile const float fastrnn_exp_max_ = FASTRNN_EXP_MAX;

static inline float fastrnn_exp_max(void) { return fastrnn_exp_max_; }

#endif
