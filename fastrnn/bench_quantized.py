"""The benchmark grid for reduced-precision inference: ``fastrnn bench --dtype int8``
(or ``bfloat16``: the same table).

For every case of :data:`fastrnn.bench.CASES`, the same weights and input as
the float32 benchmark, each library in a process of its own:

- ``f32``: fastrnn's float32 layer;
- ``int8``: ``fastrnn.quantize(layer)`` (per-channel weight scales);
- ``bf16``: ``fastrnn.quantize(layer, dtype="bfloat16")``;
- ``torch-q``: PyTorch's ``torch.ao.quantization.quantize_dynamic`` of the
  same module (qint8, its default per-tensor weight scales; dynamic uint8
  activations), for LSTM and GRU (PyTorch has no quantized RNN layer);
- ``ORT-q``: ONNX Runtime on ``onnxruntime.quantization.quantize_dynamic``
  of the float32 table's ONNX graph (``bench.ort_model``; QInt8 weights), for LSTM
  (its DynamicQuantizeLSTM; 7-bit weights on a CPU without VNNI, as ONNX
  Runtime advises there; ONNX Runtime leaves GRU and RNN nodes in
  float32, so those are not timed).

Columns: the median ms of a forward pass of each, the speed-up of int8
and bf16 over fastrnn's own float32 and of int8 over the faster quantized
peer, ``peak``: the ms the case's multiply-adds take at this machine's int8
peak on the threads (measured by ``_quant.int8_peak_gops``, a register-only
loop of the products' instruction, printed above the table with the int8
product kernel's own speed; not where AMX tiles run the products), and
fastrnn's int8 and the faster peer's time over it (``int8/pk``,
``peer/pk``: how close each is to what int8 products allow), the max and
mean abs deviation of each reduced-precision output from fastrnn's float32
output (and of that from the float64 reference, PyTorch in float64), and
the bytes of the weights each fastrnn model holds: float32's parameters
against int8's and bfloat16's packed weights (a quantized model keeps no
float32 weights: the README's Memory paragraph).
"""
import functools
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings

import numpy as np

import fastrnn
from fastrnn import _kernels, bench

LIBRARIES = ("f32", "int8", "bf16", "torch-q", "ORT-q")


def _torch_quantized(case, state_dict, x, threads):
    import torch
    from torch.ao import quantization as tq
    torch.set_num_threads(threads)
    cls = getattr(torch.nn, case.cell)
    module = cls(case.D, case.H, num_layers=case.layers, bidirectional=case.bidirectional)
    module.load_state_dict({k: torch.from_numpy(val) for k, val in state_dict.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # its deprecation notices
        quantized = tq.quantize_dynamic(torch.nn.Sequential(module), {cls},
                                        dtype=torch.qint8)[0]
    tx = torch.from_numpy(x)

    def infer():
        with torch.inference_mode():
            return quantized(tx)[0].numpy()
    return infer


def _ort_quantized(case, state_dict, x, threads, tmp):
    """ONNX Runtime's quantize_dynamic (QInt8 weights) of the float32
    bench's graph (``bench.ort_model``: its output needs no copy at the end,
    where to_onnx's Transpose and Reshape made ORT copy it). On a CPU
    without VNNI, with 7-bit weights (``reduce_range``), as ONNX Runtime's
    documentation advises there: its AVX2 products add pairs of uint8 x int8
    in int16 (``vpmaddubsw``), which saturate with full-range weights (the
    LSTM of ``step-b1-lstm`` 0.079 off float32, 0.0028 with 7 bits; the
    same speed)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    path, qpath = os.path.join(tmp, "float.onnx"), os.path.join(tmp, "int8.onnx")
    onnx.save(bench.ort_model(case, state_dict, x), path)
    quantize_dynamic(path, qpath, weight_type=QuantType.QInt8, reduce_range=_ort_reduce_range())
    session = bench.ort_session(qpath, threads)
    T, B = x.shape[:2]

    def infer():
        return session.run(None, {"X": x})[0].reshape(T, B, -1)
    return infer


@functools.cache
def _ort_reduce_range():
    """Whether ONNX Runtime's quantized model gets 7-bit weights: on an x86
    CPU without int8 dot products (AVX-512 VNNI, or AVX-VNNI, which numpy's
    feature table does not list: read from Linux's /proc/cpuinfo, so outside
    Linux only AVX-512 VNNI is seen). Other CPUs have no vpmaddubsw to
    saturate: full range."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    if _kernels._cpu_features().get("AVX512VNNI"):
        return False
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return not any(line.startswith("flags")
                           and {"avx_vnni", "avx512_vnni"} & set(line.split())
                           for line in cpuinfo)
    except OSError:
        return True


def _weight_bytes(layer, quantized):
    """Bytes of the weights the layer holds: its float32 parameters, or the
    packed int8 (bfloat16) panels with their scales and column terms, which
    are all a quantized layer keeps of its weights (no float32 copy)."""
    if not quantized:
        return sum(w.nbytes for name, w in layer.state_dict().items() if "weight" in name)
    return sum(w.packed.nbytes + w.scale.nbytes + w.comp.nbytes
               for w in layer._params.weights.values())


def measure(case_name, library, threads, repeats, output_path):
    """One library on one case, in the calling process: output saved to
    output_path; returns {"infer": ms, "weight_mb": MB (fastrnn's, else
    None)}."""
    from threadpoolctl import threadpool_limits
    case = next(c for c in bench.CASES if c.name == case_name)
    fastrnn.set_num_threads(threads)
    weight_mb = None
    # (its files in the bench's own temporary directory, the working one:
    # a child killed when the bench is stopped cannot remove its own)
    with threadpool_limits(threads, user_api="blas"), \
            tempfile.TemporaryDirectory(dir=os.getcwd()) as tmp:
        if library == "reference":
            state_dict, x = bench.case_data(case, "float64")
            try:
                infer = bench.torch_runner(case, state_dict, x, "float64", threads)[0]
            except ImportError:
                infer = bench.fastrnn_runner(case, state_dict, x, "float64")[0]
            np.save(output_path, np.asarray(infer(), np.float64))
            return {}
        state_dict, x = bench.case_data(case, "float32")
        layer = getattr(fastrnn, case.cell)(case.D, case.H, num_layers=case.layers,
                                            bidirectional=case.bidirectional)
        layer.load_state_dict(state_dict)
        if library == "f32":
            def infer():
                return layer(x)[0]
            weight_mb = _weight_bytes(layer, False) / 2**20
        elif library in ("int8", "bf16"):
            quantized = fastrnn.quantize(layer, dtype="int8" if library == "int8"
                                         else "bfloat16")
            del layer

            def infer():
                return quantized(x)[0]
            infer()
            weight_mb = _weight_bytes(quantized, True) / 2**20
        elif library == "torch-q":
            infer = _torch_quantized(case, state_dict, x, threads)
        else:
            infer = _ort_quantized(case, state_dict, x, threads, tmp)
        np.save(output_path, np.asarray(infer()))
        if case.heavy:
            repeats = max(4, repeats // 5)
        infer_ms = bench.median_ms([infer], repeats)[0]
    return {"infer": infer_ms, "weight_mb": weight_mb}


def _measure_in_child(spec):
    result = measure(**json.loads(spec))
    sys.stdout.write("\n" + json.dumps(result) + "\n")


def run_case(case, threads, repeats, libraries, rounds=1):
    """{library: result} and {library: (max, mean) abs error vs float64};
    each library's process ``rounds`` times in turn (``bench.run_rounds``),
    its time the median over the rounds ("infer"; "rounds": the time of
    each round, for the ratios of ``bench.paired_ratio``)."""
    results, errors = {}, {}
    with tempfile.TemporaryDirectory(prefix="fastrnn-bench-q-") as tmp:
        def output(library):
            return os.path.join(tmp, f"{library}.npy")

        def run_one(library):
            spec = dict(case_name=case.name, library=library, threads=threads,
                        repeats=repeats, output_path=output(library))
            return bench.run_child("fastrnn.bench_quantized", spec, tmp,
                                   ("f32", "int8", "bf16", "reference"))

        for library, rounds_of in bench.run_rounds(list(libraries), rounds, run_one,
                                                   first=bench.CASES.index(case)).items():
            results[library] = {"infer": bench.median_of_rounds(rounds_of, "infer"),
                                "rounds": [r["infer"] for r in rounds_of],
                                "weight_mb": rounds_of[0]["weight_mb"]}
        run_one("reference")
        reference = np.load(output("reference"))
        float32 = np.load(output("f32")).astype(np.float64)
        for library in results:
            # float32 against float64; the int8 ones against float32's output
            dev = np.abs(np.load(output(library)).astype(np.float64)
                         - (reference if library == "f32" else float32))
            errors[library] = (float(dev.max()), float(dev.mean()))
    return results, errors


def _int8_peak_line():
    """Print this machine's int8 multiply-add peak on one thread and the int8
    product kernel's speed (the b64-h512 step); return the peak, G integer
    ops a second (NaN where it does not bound the products: the portable
    build, or AMX tiles running them)."""
    q = fastrnn.quantized._quant
    if q.AMX or q.ISA == "portable":
        print(f"int8 products on {q.ISA}: no register-only peak measured for it")
        return float("nan")
    # the best of a peak before and one after the kernel: the machine's speed
    # drifts within seconds, and a kernel timed faster than "its peak" misleads
    peak = q.int8_peak_gops()
    kernel = q.int8_product_gops(64, 512, 2048)
    peak = max(peak, q.int8_peak_gops())
    print(f"int8 multiply-add peak {peak:.0f} G integer ops/s per thread ({q.ISA} "
          f"register-only loop, 2 ops a multiply-add); the int8 product kernel {kernel:.0f} "
          f"on one thread ({kernel / peak:.0%} of peak; 64 x 512 @ 512 x 2048, the b64-h512 "
          f"step); peak: the case's multiply-adds at that peak on the threads, int8/pk and "
          f"peer/pk: fastrnn's int8 and the faster quantized peer against it")
    return peak


def main(args, cases):
    """``fastrnn bench --dtype int8``: the table (see the module docstring)."""
    peers = []
    if bench.available("torch"):
        peers.append("torch-q")
    if bench.available("onnxruntime") and bench.available("onnx"):
        peers.append("ORT-q")
    print(f"fastrnn {fastrnn.__version__} int8 and bfloat16 ({fastrnn.quantized.INT8_SIMD} "
          f"build); {args.threads} thread{'s' * (args.threads > 1)}; median ms (blocks of 5 "
          f"calls after a pause){bench.rounds_note(args.rounds)}, "
          f"{time.strftime('%Y-%m-%d')}; errors: max / mean abs, f32 "
          f"against float64, the others against f32; weights MB")
    if "ORT-q" in peers and _ort_reduce_range():
        print("ORT-q: 7-bit weights (quantize_dynamic's reduce_range), as ONNX Runtime "
              "advises on a CPU without VNNI")
    peak = _int8_peak_line()
    print("'-': a peer not installed or without that quantized layer (PyTorch's dynamic "
          "quantization has no RNN; ONNX Runtime quantizes LSTM nodes only)")
    print(f"{'case':<20}{'f32':>9}{'int8':>9}{'bf16':>9}{'torch-q':>9}{'ORT-q':>9}"
          f"{'int8/f32':>9}{'bf16/f32':>9}{'int8/peer':>10}{'peak':>9}{'int8/pk':>8}"
          f"{'peer/pk':>8}  {'f32 err':>17}  {'int8 err':>17}"
          f"  {'bf16 err':>17}  {'torch-q err':>17}  {'ORT-q err':>17}  "
          f"{'weights f32/int8/bf16':>21}")
    own, own_bf16, over_peer = [], [], []
    for case in cases:
        libraries = ["f32", "int8", "bf16"] + [
            p for p in peers if p == "torch-q" and case.cell != "RNN"
            or p == "ORT-q" and case.cell == "LSTM"]
        results, errors = run_case(case, args.threads, args.repeats, libraries, args.rounds)

        def ms(lib):
            return results[lib]["infer"] if lib in results else float("nan")

        def err(lib):
            return (f"{errors[lib][0]:.1e} / {errors[lib][1]:.1e}" if lib in errors
                    else "-")
        # each ratio the median of the rounds' own (bench.paired_ratio)
        per_round = {lib: result["rounds"] for lib, result in results.items()}
        speed = bench.paired_ratio(per_round, ["f32"], "int8")
        speed_bf16 = bench.paired_ratio(per_round, ["f32"], "bf16")
        peer_ms = [ms(p) for p in ("torch-q", "ORT-q") if p in results]
        vs_peer = bench.paired_ratio(per_round, ["torch-q", "ORT-q"], "int8")
        own.append(speed)
        own_bf16.append(speed_bf16)
        if peer_ms:
            over_peer.append(vs_peer)
        weights = "/".join(f"{results[lib]['weight_mb']:.2f}" for lib in ("f32", "int8", "bf16"))
        peak_ms = bench.case_flops(case) / (peak * 1e9 * args.threads) * 1e3
        peer_peak = min(peer_ms) / peak_ms if peer_ms else float("nan")
        field, ratio_field = bench.field, bench.ratio_field
        print(f"{case.name:<20}"
              + "".join(field(ms(lib), 9) for lib in ("f32", "int8", "bf16", "torch-q", "ORT-q"))
              + ratio_field(speed, 9) + ratio_field(speed_bf16, 9) + ratio_field(vs_peer, 10)
              + field(peak_ms, 9) + field(ms("int8") / peak_ms, 8, ".2f")
              + field(peer_peak, 8, ".2f") + "  "
              f"{err('f32'):>17}  {err('int8'):>17}  {err('bf16'):>17}  "
              f"{err('torch-q'):>17}  {err('ORT-q'):>17}  {weights:>21}", flush=True)
    for name, ratios in (("int8", own), ("bfloat16", own_bf16)):
        print(f"{name} over float32: geometric mean {math.exp(np.mean(np.log(ratios))):.2f}x, "
              f"worst {min(ratios):.2f}x")
    if over_peer:
        print(f"int8 over the faster quantized peer: geometric mean "
              f"{math.exp(np.mean(np.log(over_peer))):.2f}x, worst {min(over_peer):.2f}x")
