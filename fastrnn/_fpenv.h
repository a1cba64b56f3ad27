/* Flush denormals to zero inside the kernels, and restore the caller's mode.
 * Saturated gates on long sequences make ever smaller cell values; denormal
 * arithmetic and libm calls on them run many times slower. The kernels also
 * round to nearest whatever the caller's rounding mode: the worker threads
 * run in their own (nearest), and a caller's other mode would make a row's
 * bits depend on which thread ran it. MXCSR (x86-64) and FPCR (AArch64) are
 * per thread, so this affects only the thread running the kernel; elsewhere
 * it does nothing. fastrnn_fpenv() reads the thread's environment (the
 * interrupt poll runs Python's signal handlers in the caller's). */
#ifndef FASTRNN_FPENV_H
#define FASTRNN_FPENV_H

#if defined(__SSE2__) || defined(_M_X64)
#include <xmmintrin.h>
#define FASTRNN_FTZ_DAZ 0x8040u  /* flush-to-zero (bit 15) | denormals-are-zero (bit 6) */
#define FASTRNN_MXCSR_RC 0x6000u /* rounding control (bits 13-14): 0 is to nearest */
static inline unsigned int fastrnn_fpenv(void) { return _mm_getcsr(); }
static inline unsigned int fastrnn_flush_denormals(void) {
    unsigned int old = _mm_getcsr();
    _mm_setcsr((old & ~FASTRNN_MXCSR_RC) | FASTRNN_FTZ_DAZ);
    return old;
}
static inline void fastrnn_restore_fpenv(unsigned int old) { _mm_setcsr(old); }
#elif defined(__aarch64__) && (defined(__GNUC__) || defined(__clang__))
/* AArch64 (Linux, macOS): FPCR's FZ bit flushes denormal inputs and results
 * of single and double precision to zero; FPCR's upper half is reserved. */
#define FASTRNN_FPCR_FZ (1u << 24)
#define FASTRNN_FPCR_RMODE (3u << 22)  /* rounding mode: 0 is to nearest */
static inline unsigned int fastrnn_fpenv(void) {
    unsigned long long fpcr;
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(fpcr));
    return (unsigned int)fpcr;
}
static inline unsigned int fastrnn_flush_denormals(void) {
    unsigned long long fpcr;
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(fpcr));
    __asm__ __volatile__("msr fpcr, %0" : : "r"((fpcr & ~(unsigned long long)FASTRNN_FPCR_RMODE)
                                                | FASTRNN_FPCR_FZ));
    return (unsigned int)fpcr;
}
static inline void fastrnn_restore_fpenv(unsigned int old) {
    unsigned long long fpcr = old;
    __asm__ __volatile__("msr fpcr, %0" : : "r"(fpcr));
}
#else
static inline unsigned int fastrnn_fpenv(void) { return 0; }
static inline unsigned int fastrnn_flush_denormals(void) { return 0; }
static inline void fastrnn_restore_fpenv(unsigned int old) { (void)old; }
#endif

#endif
