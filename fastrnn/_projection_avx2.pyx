# The same kernels as _projection.pyx, compiled with AVX2 and FMA (see setup.py);
# fastrnn/_kernels.py imports this module with the _forward build of the same name.
include "_projection.pyx"
