/* Flush denormals to zero inside the kernels, and restore the caller's mode.
 * Saturated gates on long sequences make ever smaller cell values; denormal
 * arithmetic and libm calls on them run many times slower. MXCSR (x86-64)
 * and FPCR (AArch64) are per thread, so this affects only the thread running
 * the kernel; elsewhere it does nothing. */
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
#elif defined(__aarch64__) && (defined(__GNUC__) || defined(__clang__))
/* AArch64 (Linux, macOS): FPCR's FZ bit flushes denormal inputs and results
 * of single and double precision to zero; FPCR's upper half is reserved. */
#define FASTRNN_FPCR_FZ (1u << 24)
static inline unsigned int fastrnn_flush_denormals(void) {
    unsigned long long fpcr;
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(fpcr));
    __asm__ __volatile__("msr fpcr, %0" : : "r"(fpcr | FASTRNN_FPCR_FZ));
    return (unsigned int)fpcr;
}
static inline void fastrnn_restore_fpenv(unsigned int old) {
    unsigned long long fpcr = old;
    __asm__ __volatile__("msr fpcr, %0" : : "r"(fpcr));
}
#else
static inline unsigned int fastrnn_flush_denormals(void) { return 0; }
static inline void fastrnn_restore_fpenv(unsigned int old) { (void)old; }
#endif

#endif
