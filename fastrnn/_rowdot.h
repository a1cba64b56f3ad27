/* float64's batch-1 products: y (N) += W (N x K, rows ldw apart) . v (K),
 * each output's sum in one fixed order, whichever rows a call multiplies.
 * y must not overlap v or W.
 *
 * An output's row runs in 8 lane sums (lane l takes k = l, l + 8, ...; the
 * last K % 8 values one lane each), each a chain of multiply-adds in k
 * order, then one fixed sum of the lanes. Every row takes the same
 * operations whether it is multiplied in a block of rows or alone, so a
 * unidirectional float64 layer at batch 1 runs the same recurrence with
 * its hidden units split between threads (each part multiplies its own
 * rows, _forward.recur_units) as in one thread, and as a split call that
 * finds the workers busy and runs in one thread. OpenBLAS's gemv rounded a
 * part's rows differently from the whole matrix's (~1e-16), so one call
 * could give two results at one thread count.
 *
 * GCC and Clang: each row's lanes 0-3 and 4-7 in two vectors of 4 doubles
 * (an AVX2 register each, two SSE2 ones), FASTRNN_ROWDOT_ROWS rows in
 * flight (as many accumulators as the registers hold); a * b + c fused in
 * the FMA builds in the vectors and the tail alike (GCC's and Clang's
 * default contraction in GNU C), plain in the others. Elsewhere (MSVC) the
 * same order in plain loops, with its own rounding of a * b + c. Against
 * OpenBLAS's gemv (GRU 64->256 and 64->512, float64, batch 1, T = 400, one
 * and two threads, an AVX-512 Xeon): the AVX-512 and AVX2 builds within 10%
 * (256: 11-16 against 11-14 ms at one thread; 512: 95-100 against 97-102);
 * the portable build (SSE2, no FMA) 1.3-2x slower there, where OpenBLAS
 * still ran its AVX-512 kernel.
 */
#ifndef FASTRNN_ROWDOT_H
#define FASTRNN_ROWDOT_H

#include <stddef.h>
#include <string.h>

#if defined(__AVX512F__)
#define FASTRNN_ROWDOT_ROWS 8   /* 16 of the 32 zmm/ymm registers */
#elif defined(__AVX2__)
#define FASTRNN_ROWDOT_ROWS 4   /* 8 of the 16 ymm registers */
#else
#define FASTRNN_ROWDOT_ROWS 2   /* 8 of the 16 xmm registers (SSE2), or NEON's */
#endif

/* the lanes' fixed sum */
#define FASTRNN_ROWDOT_SUM(t) \
    (((t[0] + t[4]) + (t[2] + t[6])) + ((t[1] + t[5]) + (t[3] + t[7])))

#if defined(__GNUC__) || defined(__clang__)
typedef double fastrnn_d4 __attribute__((vector_size(32)));
/* (a memcpy, not a function returning the vector: no ABI note where the
 * build has no 32-byte registers) */
#define FASTRNN_D4_LOAD(dst, p) memcpy(&(dst), (p), sizeof(fastrnn_d4))

/* rows (a constant: the call is inlined) rows of W from w, into y */
static inline __attribute__((always_inline)) void fastrnn_rowdot_block(
        const double* v, ptrdiff_t K, const double* w, ptrdiff_t ldw, double* y, int rows) {
    fastrnn_d4 lo[FASTRNN_ROWDOT_ROWS], hi[FASTRNN_ROWDOT_ROWS], v0, v1, w0, w1;
    double t[8];
    ptrdiff_t k, l;
    int r;
    for (r = 0; r < rows; r++)
        lo[r] = hi[r] = (fastrnn_d4){0, 0, 0, 0};
    for (k = 0; k + 8 <= K; k += 8) {
        FASTRNN_D4_LOAD(v0, v + k);
        FASTRNN_D4_LOAD(v1, v + k + 4);
        for (r = 0; r < rows; r++) {
            FASTRNN_D4_LOAD(w0, w + r * ldw + k);
            FASTRNN_D4_LOAD(w1, w + r * ldw + k + 4);
            lo[r] = w0 * v0 + lo[r];
            hi[r] = w1 * v1 + hi[r];
        }
    }
    for (r = 0; r < rows; r++) {
        memcpy(t, &lo[r], sizeof lo[r]);
        memcpy(t + 4, &hi[r], sizeof hi[r]);
        for (l = 0; k + l < K; l++)
            t[l] = w[r * ldw + k + l] * v[k + l] + t[l];
        y[r] = y[r] + FASTRNN_ROWDOT_SUM(t);
    }
}
#else
static void fastrnn_rowdot_block(const double* v, ptrdiff_t K, const double* w, ptrdiff_t ldw,
                                 double* y, int rows) {
    double t[8];
    ptrdiff_t k, l;
    int r;
    for (r = 0; r < rows; r++) {
        for (l = 0; l < 8; l++)
            t[l] = 0;
        for (k = 0; k + 8 <= K; k += 8)
            for (l = 0; l < 8; l++)
                t[l] = w[r * ldw + k + l] * v[k + l] + t[l];
        for (l = 0; k + l < K; l++)
            t[l] = w[r * ldw + k + l] * v[k + l] + t[l];
        y[r] = y[r] + FASTRNN_ROWDOT_SUM(t);
    }
}
#endif

/* y (N) += W (N x K, rows ldw apart) . v (K): FASTRNN_ROWDOT_ROWS rows at a
 * time, then one */
static inline void fastrnn_rowdot(const double* v, ptrdiff_t K, const double* w, ptrdiff_t ldw,
                                  ptrdiff_t N, double* y) {
    ptrdiff_t n = 0;
    for (; n + FASTRNN_ROWDOT_ROWS <= N; n += FASTRNN_ROWDOT_ROWS)
        fastrnn_rowdot_block(v, K, w + n * ldw, ldw, y + n, FASTRNN_ROWDOT_ROWS);
    for (; n < N; n++)
        fastrnn_rowdot_block(v, K, w + n * ldw, ldw, y + n, 1);
}

#endif
