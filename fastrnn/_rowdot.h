/* float64's batch-1 products: y (N) += W (N x K, rows ldw apart) . v (K),
 * each output's sum in one fixed order, whichever rows a call multiplies.
 *
 * An output's row runs in 8 lane sums (lane l takes k = l, l + 8, ...; the
 * last K % 8 values one lane each), each a chain of multiply-adds in k
 * order, then one fixed sum of the lanes. Every row takes the same
 * operations whether it is multiplied in a block of eight rows or alone,
 * so a unidirectional float64 layer at batch 1 gives the same bits with
 * its hidden units split between threads (each part multiplies its own
 * rows, _forward.recur_units) as in one thread, and as a split call that
 * finds the workers busy and runs in one thread. OpenBLAS's gemv rounded a
 * part's rows differently from the whole matrix's (~1e-16), so one call
 * could give two results at one thread count.
 *
 * GCC and Clang: vectors of 8 doubles (one AVX-512 register, two AVX2,
 * four SSE2), a * b + c fused in the FMA builds in the blocks and the tail
 * alike (-ffp-contract=fast, GCC's default), eight rows' chains in flight.
 * Elsewhere (MSVC) the same order in plain loops. Against OpenBLAS's gemv
 * here (GRU 64->512, batch 1, float64): the same speed; 10-20% slower at
 * H = 256 (1.5 MB of W_hh, its part on each core's L2).
 */
#ifndef FASTRNN_ROWDOT_H
#define FASTRNN_ROWDOT_H

#include <stddef.h>
#include <string.h>

#if defined(__GNUC__) || defined(__clang__)
typedef double fastrnn_d8 __attribute__((vector_size(64)));

static inline __attribute__((always_inline)) fastrnn_d8 fastrnn_d8_load(const double* p) {
    fastrnn_d8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* rows (a constant: the call is inlined) rows of W from w, into y */
static inline __attribute__((always_inline)) void fastrnn_rowdot_block(
        const double* v, ptrdiff_t K, const double* w, ptrdiff_t ldw, double* y, int rows) {
    fastrnn_d8 acc[8];
    ptrdiff_t k, l;
    int r;
    for (r = 0; r < rows; r++)
        acc[r] = (fastrnn_d8){0, 0, 0, 0, 0, 0, 0, 0};
    for (k = 0; k + 8 <= K; k += 8) {
        fastrnn_d8 vk = fastrnn_d8_load(v + k);
        for (r = 0; r < rows; r++)
            acc[r] = fastrnn_d8_load(w + r * ldw + k) * vk + acc[r];
    }
    for (l = 0; k + l < K; l++)
        for (r = 0; r < rows; r++)
            acc[r][l] = w[r * ldw + k + l] * v[k + l] + acc[r][l];
    for (r = 0; r < rows; r++)
        y[r] = y[r] + (((acc[r][0] + acc[r][4]) + (acc[r][2] + acc[r][6]))
                       + ((acc[r][1] + acc[r][5]) + (acc[r][3] + acc[r][7])));
}
#else
static void fastrnn_rowdot_block(const double* v, ptrdiff_t K, const double* w, ptrdiff_t ldw,
                                 double* y, int rows) {
    double acc[8][8];
    ptrdiff_t k, l;
    int r;
    for (r = 0; r < rows; r++)
        for (l = 0; l < 8; l++)
            acc[r][l] = 0;
    for (k = 0; k + 8 <= K; k += 8)
        for (r = 0; r < rows; r++)
            for (l = 0; l < 8; l++)
                acc[r][l] = w[r * ldw + k + l] * v[k + l] + acc[r][l];
    for (l = 0; k + l < K; l++)
        for (r = 0; r < rows; r++)
            acc[r][l] = w[r * ldw + k + l] * v[k + l] + acc[r][l];
    for (r = 0; r < rows; r++)
        y[r] = y[r] + (((acc[r][0] + acc[r][4]) + (acc[r][2] + acc[r][6]))
                       + ((acc[r][1] + acc[r][5]) + (acc[r][3] + acc[r][7])));
}
#endif

/* y (N) += W (N x K, rows ldw apart) . v (K): eight rows at a time, then one */
static void fastrnn_rowdot(const double* v, ptrdiff_t K, const double* w, ptrdiff_t ldw,
                           ptrdiff_t N, double* y) {
    ptrdiff_t n = 0;
    for (; n + 8 <= N; n += 8)
        fastrnn_rowdot_block(v, K, w + n * ldw, ldw, y + n, 8);
    for (; n < N; n++)
        fastrnn_rowdot_block(v, K, w + n * ldw, ldw, y + n, 1);
}

#endif
