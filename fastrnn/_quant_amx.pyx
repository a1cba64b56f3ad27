# The same kernels as _quant.pyx, compiled for amx (see setup.py);
# fastrnn/quantized.py imports the widest build the CPU runs.
include "_quant.pyx"
