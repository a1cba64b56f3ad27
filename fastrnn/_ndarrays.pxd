# Checks of plain ndarray arguments shared by the lean call paths
# (_forward.SequenceRunner and CellStep, _quant.QRunner): C-level tests that let a small
# call skip the general path's Python checks, and fall back to it (which
# validates and reports) on anything else.

cimport numpy as cnp
from libc.string cimport memcpy


cdef inline bint behaved(cnp.ndarray a, int typenum):
    """a holds values of the given dtype in native byte order, aligned: the
    type number alone does not tell '>f4' from '<f4'."""
    return cnp.PyArray_TYPE(a) == typenum and cnp.PyArray_ISBEHAVED_RO(a)


cdef inline bint plain_input(object x, int typenum, int ndim_lo, int ndim_hi, Py_ssize_t D):
    """x is a C-contiguous ndarray of the given dtype (native byte order,
    aligned) of ndim_lo to ndim_hi dimensions, the last of size D."""
    cdef int ndim
    if type(x) is not cnp.ndarray:
        return False
    ndim = cnp.PyArray_NDIM(<cnp.ndarray>x)
    return (behaved(<cnp.ndarray>x, typenum) and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>x)
            and ndim_lo <= ndim <= ndim_hi and cnp.PyArray_DIM(<cnp.ndarray>x, ndim - 1) == D)


cdef inline object state_copy(object a, int typenum, Py_ssize_t ndim, cnp.npy_intp* dims):
    """A fresh C-contiguous copy of a (a plain ndarray of exactly these
    dtype and dims), or None when a is anything else."""
    cdef Py_ssize_t i
    cdef object out
    if (type(a) is not cnp.ndarray or not behaved(<cnp.ndarray>a, typenum)
            or cnp.PyArray_NDIM(<cnp.ndarray>a) != ndim):
        return None
    for i in range(ndim):
        if cnp.PyArray_DIM(<cnp.ndarray>a, i) != dims[i]:
            return None
    if not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>a):
        return cnp.PyArray_NewCopy(<cnp.ndarray>a, cnp.NPY_CORDER)
    # the common case, a plain block: an empty array and one memcpy. A
    # NewCopy goes through numpy's casting and iterator set-up: an
    # LSTMCell(16, 32) step (its h and c copied) took 1.57 -> 1.11 us at
    # batch 1 and 2.37 -> 1.70 at batch 4, a GRUCell's 1.62 -> 1.43 at
    # batch 4 (CellStep.step alone, 10^6 calls, medians of 5 alternating
    # processes; Intel Xeon, 2026-12-05)
    out = cnp.PyArray_EMPTY(<int>ndim, dims, typenum, 0)
    memcpy(cnp.PyArray_DATA(<cnp.ndarray>out), cnp.PyArray_DATA(<cnp.ndarray>a),
           cnp.PyArray_NBYTES(<cnp.ndarray>a))
    return out


cdef inline object initial_states(object hx, bint has_c, int typenum, Py_ssize_t ndim,
                                  cnp.npy_intp* dims):
    """(h, c) to start a call from: fresh arrays of these dtype and dims
    holding hx (h, or the tuple (h, c) when has_c), zeros for hx None; c
    None unless has_c. None when hx is anything else."""
    cdef object h_in, c_in = None, h, c = None
    if hx is None:
        h = cnp.PyArray_ZEROS(<int>ndim, dims, typenum, 0)
        if has_c:
            c = cnp.PyArray_ZEROS(<int>ndim, dims, typenum, 0)
        return h, c
    if has_c:
        if type(hx) is not tuple or len(<tuple>hx) != 2:
            return None
        h_in, c_in = (<tuple>hx)[0], (<tuple>hx)[1]
    else:
        h_in = hx
    h = state_copy(h_in, typenum, ndim, dims)
    if h is None:
        return None
    if has_c:
        c = state_copy(c_in, typenum, ndim, dims)
        if c is None:
            return None
    return h, c
