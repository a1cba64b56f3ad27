/* The tuning constants of the native side, in one place, each with the
 * measurement or the fact that set it (those of the Python side are in
 * _plan.py). C headers include this file; the Cython modules read it through
 * _tuning.pxd. */
#ifndef FASTRNN_TUNING_H
#define FASTRNN_TUNING_H

/* --- the thread pool (_worker.h) --- */

/* How long an idle worker spins for the next job before it sleeps: a
 * call's parts come microseconds apart, and a sleeping thread (on a virtual
 * machine an idle core too) takes tens of microseconds or more to wake,
 * often on its caller's CPU. 1 ms, not 0.3: within a training step the
 * caller's own phases (packing, numpy) can run past 0.3 ms, the more so
 * when the worker just woke on the caller's CPU and slows it; the worker
 * then slept and woke again inside every step, and after a pause took 0-3
 * of a step's 10 parts for several steps (RNN 64->128, B=32, T=100, 2
 * threads, blocks of calls after 0.25 s as the bench times them: 4.0-5.0
 * ms a step against 2.9-3.5 at 1 ms; 2 ms did no better). The cost: an
 * idle core busy for 1 ms after a call's last job. */
#define FASTRNN_WORKER_SPIN_NS 1000000LL
/* Pauses between yields while a thread waits for another (0.8 us on the
 * Xeon, 12 ns a pause; ~2 us where a pause takes 30 ns; the pool's workers
 * and the unit split's barrier): if the scheduler put both
 * on one core, a wait then costs a yield, not a time slice (measured: 10-14
 * ms instead of 0.9 ms for GRU 64->256, T=100, now and then on this shared
 * VM); with a core each, a yield that finds nothing else to run returns at
 * once. */
#define FASTRNN_WAIT_SPINS 64LL

/* --- Ctrl-C during long calls (_worker.pyx) --- */

/* How often the calling thread runs the signal handlers during a call:
 * Ctrl-C is answered within about this time (taking the GIL costs ~1 us). */
#define FASTRNN_INTERRUPT_POLL_NS 20000000LL
/* Steps between two readings of the clock (~20 ns each). */
#define FASTRNN_INTERRUPT_STEPS_PER_CLOCK 8
/* Multiply-adds of one block of a long call's large products (input
 * projection, input and weight gradients: ~3-5 ms on one core), between
 * which it looks for an interrupt too. */
#define FASTRNN_INTERRUPT_BLOCK_MACS 134217728
/* Values of one block of BPTT's packing of its saved rows (_backward's
 * pack_rows: 4 MB, ~0.5-2 ms where the buffer is touched first), between
 * which it looks for an interrupt: a cold step packs hundreds of MB. */
#define FASTRNN_INTERRUPT_PACK_VALUES 1048576

/* --- the streaming path of a cell call (_forward.pyx.tp: CellStep) --- */

/* Multiply-adds of a batched cell step (B * G * H * (D + H)) above which,
 * with more than one thread, the call takes the layers' driver, which
 * splits the batch between the threads, rather than the streaming path,
 * which runs it on one thread without the driver's 15-20 us of Python.
 * Measured at 2 threads on the Intel Xeon (us a call, the streaming path
 * at B <= 64, the driver above, as the bound was then): LSTMCell(16, 32)
 * B = 64 11 (0.4 M), B = 65 27, 256 57 (1.6 M; streaming would take ~45),
 * 512 96 (3.1 M; ~90); LSTMCell(64, 128) B = 64 89 (6.3 M), B = 65 70;
 * GRUCell(128, 256) B = 64 227 (19 M), B = 65 144. One thread: the
 * streaming path at any size (the driver's B = 65 took 104 us where
 * B = 64 took 80). */
#define FASTRNN_CELL_STEP_SPLIT_MACS 2097152LL
/* Rows above which a cell step takes the driver at any thread count: the
 * streaming path allocates its scratch afresh each call (B * (2 G H + S)
 * floats, whose pages then fault in) and polls no interrupt. One thread,
 * the streaming path against the driver: GRUCell(256, 256) B = 1024 5.2
 * and 5.3 ms, B = 4096 46 and 28; LSTMCell(512, 512) B = 1024 29.0 and
 * 27.7 ms (2026-12-06). */
#define FASTRNN_CELL_STEP_MAX_ROWS 1024

/* --- products --- */

/* OpenBLAS runs a gemm on one thread when m * n * k <= 65536 * 4 and a gemv
 * when m * n < 2304 * 4 (its interface/gemm.c, gemv.c): the float64 kernels
 * keep their per-step calls under these when they cannot hold BLAS at one
 * thread (waking its threads every step made training 3-6x slower on 2
 * cores). */
#define FASTRNN_GEMM_ONE_THREAD_MNK 262144
#define FASTRNN_GEMV_ONE_THREAD_MN 9215
/* Below this many multiply-adds a float64 batch-1 product is a plain loop,
 * not a BLAS call (for small sizes the call costs more than the
 * arithmetic). */
#define FASTRNN_AXPY_MAX 65536
/* A float64 bidirectional window's input projection of a batch-first input
 * (_forward.pyx.tp: _window_projection) copies this many of a part's rows
 * (at least a step's) time-major into its scratch, then multiplies them in
 * one BLAS call: 256 x D doubles, 256 KB at D = 128, in L2. */
#define FASTRNN_WINDOW_GEMM_ROWS 256
/* Rows of one block of the weight gradients' sums over rows: the block's
 * packed activations (256 x D floats) stay in L2 while every tile of the
 * block reads them. */
#define FASTRNN_WEIGHT_BLOCK_ROWS 256
/* Rows of one group of the float32 weight gradients' sums over rows (float64
 * sums run one chain over every row): each element's chain of float32
 * additions runs over a group's rows, and the groups' totals are added
 * after (the first group's chain starts from the gradient itself). One
 * chain over all T * B rows lost precision in proportion to them, and a sum
 * of equal terms stopped growing at 2^24 of them (a bias gradient of 25.2 M
 * rows of 1 was 16 777 216); with groups
 * the error grows with the group's length plus the groups' count. 16
 * blocks: the added pass over the group's gradient columns costs one
 * multiply-add per 4096 a weight. */
#define FASTRNN_WEIGHT_GROUP_ROWS (16 * FASTRNN_WEIGHT_BLOCK_ROWS)
/* Rows of dG^T (gate columns) that one pass over every panel of a block
 * multiplies (_microkernel.pxd: packed_product_by_rows): 48 x 256 floats, 48
 * KB, stay in L1 and L2 while the panels pass; 48 = 8 tiles of 6 rows
 * (AVX-512, 4 vectors), 16 of 3 (AVX2); narrower packs (D or H under 4
 * vectors) take taller tiles, whole in 48 rows but AVX2's 5-row ones. */
#define FASTRNN_WEIGHT_CHUNK_ROWS 48
/* A product over many rows of A (a layer's input projection over all its
 * steps and directions, the input gradient) runs in chunks of rows whose A
 * takes about this many bytes, every panel of B before the next chunk
 * (_microkernel.pxd: product_chunk_rows; at least 48 rows): the chunk
 * stays in L2 while the panels pass, instead of all of A coming again
 * from L3 for each column group. Measured on the Intel Xeon (product_gflops, 4 gates x 128
 * units): K = 293, 1920 rows at once 150 GFLOP/s, 48-384 rows 187-191;
 * K = 510: 24-96 rows ~198, 192-384 ~180, 768 159; K = 64: 192-384 rows
 * ~180, 1920 127. Calls at 1 thread, A/B: stack2-b32 1.045x, imdb-b64
 * 1.10x, ds2-b20 and long-b8 1.04x; 2 threads and training within noise. */
#define FASTRNN_PRODUCT_CHUNK_BYTES (128 * 1024)
/* A time-major call in parts projects each part's rows of a chunk of steps
 * (_forward.pyx.tp: _packed_projection), every panel passing the whole
 * chunk (before: each batch row's steps alone, all of W_ih for a window's
 * few rows; LSTM 256->512 B=64 at 2 threads, old and new builds in
 * alternating processes: 0.83-0.98x the time in five runs, 0.87-0.93x in
 * three runs of a variant whose chunks held at least 8 steps). A call of
 * the micro-kernel
 * takes a step's rows of the part when they are at least
 * FASTRNN_PROJECTION_TILE_ROWS (tiles of 6 to 8 rows), else one row's
 * steps (at least as many), strided. Measured at 2 threads on the Intel
 * Xeon (Ice Lake, 1.25 MB L2), calls of each kind interleaved in one
 * process, medians: LSTM 256->256 two layers B=8 T=2000 (4 rows a part) a
 * row's steps 0.90-0.97x the time of a step's rows; GRU 800->800 B=20
 * T=300 (10 rows) a step's rows 0.94-0.97x of a row's 8 or 24 steps; LSTM
 * 256->512 B=64 (32 rows) within noise either way. */
#define FASTRNN_PROJECTION_TILE_ROWS 8
/* The micro-kernel prefetches its panel FASTRNN_MK_PREFETCH_K steps of k
 * ahead when a tile's panel takes more than FASTRNN_MK_PREFETCH_BYTES (it
 * then streams from L2, not L1: 48 KB of L1 data on the Intel Xeon measured,
 * 32 KB on Zen 4, with the tile's rows of A beside it). A 6 x 4 AVX-512 tile
 * over an L2 panel (K = 512 or 2048): 174 -> 181 GFLOP/s; over an L1 panel
 * (K = 64, 128) prefetching costs 1% (Intel Xeon, 2026-12-02). A one-row
 * tile (batch 1) reads its panel as fast as L2 delivers it, the hardware
 * prefetcher keeps up, and the prefetches only cost: it makes none (M = 1,
 * K = 256, a GRU's 3 gates: 64-67 -> 70-71 GFLOP/s). */
#define FASTRNN_MK_PREFETCH_BYTES 32768
#define FASTRNN_MK_PREFETCH_K 8
/* Where the panels of one product take more than FASTRNN_MK_STREAM_BYTES
 * they may not all stay in L2 (2 MB per core on the Intel Xeon measured, 1
 * MB on Zen 4, with A, C and the step's other arrays beside them): each
 * group's first tile would wait on L3 for its panel, so the tiles of the
 * group before fetch it into L2 (_microkernel.h). In a C copy of the kernel
 * on the Xeon, 3 rounds alternating: 4 MB of panels (64 x 512 @ 512 x 2048,
 * the b64-h512 step) 146-153 -> 160-166 GFLOP/s, 2 MB 157-167 -> 163-168;
 * panels that stay in L2 (1 and 1.5 MB) lost 2-3%. The bound is set for
 * the smaller L2s (Zen 4's 1 MB), at that cost on the Xeon between 1 and 2
 * MB. forward.product_gflops: M = 64, K = 512 140-152 -> 158-166; M = 20,
 * K = 800, 3 gates (ds2-b20's GRU step) 123-138 -> 157-165 (2026-12-02). */
#define FASTRNN_MK_STREAM_BYTES 1048576
/* Packed int8 weights past this many bytes (beyond a 1 MB L2) are
 * multiplied column group by column group (_qkernel.h: fastrnn_q_product),
 * each group's panel fetched once from L3 for every tile of rows; smaller
 * ones row tile by row tile, whose outputs and added rows the hardware
 * prefetches in order (column groups outside cost 10% at B = 256, H = 64).
 * _quant.int8_product_gops on the Ice Lake Xeon (1.25 MB L2), old and new
 * builds in alternating processes, 3 rounds: M = 20, K = 800, N = 2400
 * (ds2-b20's GRU step, 1.9 MB) 272-280 -> 318-416 G ops/s, M = 64 285-295
 * -> 370-457, M = 10 188-192 -> 233-260; 1 MB (the b64-h512 step, row tiles
 * outer in both) the same. int8 ds2-b20: 1 thread 170-202 -> 118-132 ms,
 * 2 threads 99-101 -> 75-76 ms (2026-12-04). */
#define FASTRNN_Q_GROUPS_OUTER_BYTES 1048576

#endif
