# The same kernels as _quant.pyx, compiled for AVX-512 VNNI and BF16 (see
# setup.py); fastrnn/quantized.py imports the widest build the CPU runs.
include "_quant.pyx"
