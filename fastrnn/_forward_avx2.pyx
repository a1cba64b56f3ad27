# The same kernels as _forward.pyx, compiled with AVX2 and FMA (see setup.py);
# fastrnn/_kernels.py imports this module instead on CPUs that have both.
include "_forward.pyx"
