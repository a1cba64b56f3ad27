# The native tuning constants (_tuning.h, where each is explained) under the
# names the Cython modules use.

cdef extern from "_tuning.h":
    enum:
        WAIT_SPINS "FASTRNN_WAIT_SPINS"
        INTERRUPT_STEPS_PER_CLOCK "FASTRNN_INTERRUPT_STEPS_PER_CLOCK"
        INTERRUPT_BLOCK_MACS "FASTRNN_INTERRUPT_BLOCK_MACS"
        GEMM_ONE_THREAD_MNK "FASTRNN_GEMM_ONE_THREAD_MNK"
        GEMV_ONE_THREAD_MN "FASTRNN_GEMV_ONE_THREAD_MN"
        AXPY_MAX "FASTRNN_AXPY_MAX"
        WEIGHT_BLOCK_ROWS "FASTRNN_WEIGHT_BLOCK_ROWS"
    const long long INTERRUPT_POLL_NS "FASTRNN_INTERRUPT_POLL_NS"
