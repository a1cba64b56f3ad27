# The same kernels as _forward.pyx, compiled with AVX-512 (see setup.py);
# fastrnn/_kernels.py imports this module instead on CPUs that have it.
include "_forward.pyx"
