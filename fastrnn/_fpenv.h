/* Flush denormals to zero inside the kernels, and restore the caller's mode.
 * Saturated gates on long sequences make ever smaller cell values; denormal
 * arithmetic and libm calls on them run many times slower. MXCSR is per
 * thread, so this affects only the thread running the kernel. */
#ifndef FASTRNN_FPENV_H
#define FASTRNN_FPENV_H

#if defined(__SSE2__) || defined(_M_X64)
#include <xmmintrin.h>
#define FASTRNN_FTZ_DAZ 0x8040u  /* flush-to-zero (bit 15) | denormals-are-zero (bit 6) */
static inline unsigned int fastrnn_flush_denormals(void) {
    unsigned int old = _mm_getcsr();
    _mm_setcsr(old | FASTRNN_FTZ_DAZ);
    return old;
}
static inline void fastrnn_restore_fpenv(unsigned int old) { _mm_setcsr(old); }
#else
static inline unsigned int fastrnn_flush_denormals(void) { return 0; }
static inline void fastrnn_restore_fpenv(unsigned int old) { (void)old; }
#endif

#endif
