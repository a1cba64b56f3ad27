"""from_onnx on damaged and hostile files: each gives a ValueError or TypeError
naming what is wrong, quickly and in bounded memory (skipped without onnx).

The corpus (a few hundred bytes to a few hundred KB per file) is written to a
temporary directory and imported by one child process, which first measures
the address space an import of fastrnn and onnx takes and then limits itself
to that plus 1.5 GiB (RLIMIT_AS), and times each from_onnx call.
"""
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import AttributeProto, TensorProto, helper, numpy_helper  # noqa: E402

import fastrnn  # noqa: E402

MEMORY_HEADROOM = 3 * 2**29     # 1.5 GiB over what the import of fastrnn and onnx takes
SECONDS_PER_CALL = 2.0
CHILD_TIMEOUT = 60.0            # the import and the whole corpus

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    sys.path.insert(0, sys.argv[3])   # the fastrnn the tests import
    import fastrnn, onnx

    def address_space():
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024

    baseline = address_space()
    limit = baseline + int(sys.argv[2])
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    print(json.dumps({"baseline": baseline, "limit": limit}), flush=True)
    for name, path in json.loads(sys.argv[1]):
        start = time.perf_counter()
        try:
            fastrnn.from_onnx(path)
            kind, message = "returned", ""
        except BaseException as exc:   # reported to the parent, which judges
            kind, message = type(exc).__name__, str(exc)[:3000]
        print(json.dumps({"name": name, "type": kind, "message": message,
                          "seconds": time.perf_counter() - start}), flush=True)
""")


# --- building blocks ----------------------------------------------------------------
def _tensor(name, dims, data_type=TensorProto.FLOAT, raw=None, **fields):
    tensor = TensorProto(name=name, data_type=data_type)
    tensor.dims.extend(dims)
    if raw is not None:
        tensor.raw_data = raw
    for field, values in fields.items():
        getattr(tensor, field).extend(values)
    return tensor


def _weights(G=4, H=2, D=3, dirs=1, bias=False, seed=0):
    rng = np.random.default_rng(seed)
    tensors = [numpy_helper.from_array(rng.uniform(-1, 1, (dirs, G * H, D)).astype(np.float32),
                                       "W"),
               numpy_helper.from_array(rng.uniform(-1, 1, (dirs, G * H, H)).astype(np.float32),
                                       "R")]
    if bias:
        tensors.append(numpy_helper.from_array(
            rng.uniform(-1, 1, (dirs, 2 * G * H)).astype(np.float32), "B"))
    return tensors


def _model(nodes, initializers=(), inputs=("X",), outputs=("Y",), sparse=()):
    graph = helper.make_graph(
        list(nodes), "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in inputs],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        initializer=list(initializers), sparse_initializer=list(sparse))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _lstm(attrs=None, inputs=("X", "W", "R"), tensors=None, op="LSTM", name="lstm",
          outputs=("Y",), domain=None):
    """One recurrent node (LSTM, H=2, D=3 unless told) as serialized bytes."""
    attrs = {"hidden_size": 2} if attrs is None else attrs
    node = helper.make_node(op, list(inputs), list(outputs), name=name, domain=domain)
    for key, value in attrs.items():
        node.attribute.append(value if isinstance(value, AttributeProto)
                              else helper.make_attribute(key, value))
    return _model([node], _weights() if tensors is None else tensors).SerializeToString()


def _exported(**kwargs):
    return fastrnn.to_onnx(fastrnn.LSTM(3, 4, seed=0, **kwargs)).SerializeToString()


def _int64s(name, values):
    return numpy_helper.from_array(np.asarray(values, np.int64), name)


def _varint(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number, payload):   # a length-delimited protobuf field
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _nested_subgraphs(depth):
    """ModelProto bytes with If nodes nested ``depth`` deep through their
    then_branch graphs (written by hand: onnx's own builders refuse it)."""
    graph = b""
    for _ in range(depth):
        attribute = _field(1, b"then_branch") + _varint(20 << 3) + _varint(5) + _field(6, graph)
        node = _field(4, b"If") + _field(5, attribute)
        graph = _field(1, node)
    return _field(7, graph)


def _many_nodes(count, last_hidden_size=2):
    """``count`` LSTM nodes sharing one W and R (each a few dozen bytes)."""
    nodes = [helper.make_node("LSTM", ["X", "W", "R"], [f"Y{i}"], name=f"n{i}",
                              hidden_size=last_hidden_size if i == count - 1 else 2)
             for i in range(count)]
    return _model(nodes, _weights(), outputs=[f"Y{count - 1}"]).SerializeToString()


def _batch_first_time_major_out(chain):
    """X -> Transpose(1,0,2) -> Identity x chain -> LSTM -> Squeeze -> Identity x
    chain -> graph output: batch-first in, time-major out."""
    nodes = [helper.make_node("Transpose", ["X"], ["x0"], perm=[1, 0, 2])]
    nodes += [helper.make_node("Identity", [f"x{i}"], [f"x{i + 1}"]) for i in range(chain)]
    nodes.append(helper.make_node("LSTM", [f"x{chain}", "W", "R"], ["y0"], name="deep",
                                  hidden_size=2))
    nodes.append(helper.make_node("Squeeze", ["y0", "axis"], ["z0"]))
    nodes += [helper.make_node("Identity", [f"z{i}"], [f"z{i + 1}"]) for i in range(chain)]
    nodes.append(helper.make_node("Identity", [f"z{chain}"], ["Y"]))
    return _model(nodes, _weights() + [_int64s("axis", [1])]).SerializeToString()


def _huge_shape_constant():
    """A batch-first LSTM whose merge Reshape's shape initializer declares
    2**40 values and holds none: it must be judged without reading it."""
    nodes = [helper.make_node("Transpose", ["X"], ["xt"], perm=[1, 0, 2]),
             helper.make_node("LSTM", ["xt", "W", "R"], ["y"], name="huge_shape",
                              hidden_size=2),
             helper.make_node("Transpose", ["y"], ["yt"], perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["yt", "shape"], ["m"]),
             helper.make_node("Transpose", ["m"], ["Y"], perm=[1, 0, 2])]
    shape = _tensor("shape", [2**40], TensorProto.INT64)
    return _model(nodes, _weights() + [shape]).SerializeToString()


def _cycle():
    """Two LSTM nodes each reading the other's output."""
    nodes = [helper.make_node("LSTM", ["xa", "W", "R"], ["ya"], name="a", hidden_size=2),
             helper.make_node("Squeeze", ["ya", "axis"], ["xb"]),
             helper.make_node("LSTM", ["xb", "W", "R"], ["yb"], name="b", hidden_size=2),
             helper.make_node("Squeeze", ["yb", "axis"], ["xa"])]
    return _model(nodes, _weights() + [_int64s("axis", [1])], inputs=(),
                  outputs=("ya",)).SerializeToString()


def _chain_width_mismatch():
    """A second LSTM reading the first one's output (width 2) with W for D = 3."""
    nodes = [helper.make_node("LSTM", ["X", "W", "R"], ["ya"], name="a", hidden_size=2),
             helper.make_node("Squeeze", ["ya", "axis"], ["xb"]),
             helper.make_node("LSTM", ["xb", "W", "R"], ["yb"], name="b", hidden_size=2)]
    return _model(nodes, _weights() + [_int64s("axis", [1])],
                  outputs=("yb",)).SerializeToString()


def _external(location):
    W, R = _weights()
    W.ClearField("raw_data")
    W.data_location = TensorProto.EXTERNAL
    W.external_data.add(key="location", value=location)
    return _model([helper.make_node("LSTM", ["X", "W", "R"], ["Y"], name="ext",
                                    hidden_size=2)], [W, R]).SerializeToString()


def _sparse_weight():
    W, R = _weights()
    values = _tensor("W", [1], raw=np.float32([0.5]).tobytes())
    indices = _int64s("W_indices", [0])
    sparse = helper.make_sparse_tensor(values, indices, [1, 8, 3])
    return _model([helper.make_node("LSTM", ["X", "W", "R"], ["Y"], name="sparse",
                                    hidden_size=2)], [R], sparse=[sparse]).SerializeToString()


def _invalid_utf8_name(name=b"NA\xff\xfe\xfdMRK"):
    data = _lstm({"hidden_size": 2.5}, name="N" * len(name))
    return data.replace(b"N" * len(name), name)


def _truncated():
    data = _exported(bidirectional=True)
    return data[:len(data) // 2]


def _nan_weights():
    W, R = _weights()
    values = numpy_helper.to_array(R).copy()
    values[0, 3, 1] = np.nan
    return _lstm(tensors=[W, numpy_helper.from_array(values, "R")])


F32 = np.float32(0.25).tobytes()
A = AttributeProto

# name -> (bytes of the file, or a path to use as is; exception type; message pattern)
CORPUS = {
    "truncated": (_truncated(), "ValueError", r"from_onnx: cannot read an ONNX model"),
    "random_bytes": (np.random.default_rng(0).bytes(3000), "ValueError",
                     r"from_onnx: (cannot read an ONNX model|the model has no RNN, GRU or LSTM)"),
    "empty_file": (b"", "ValueError", r"from_onnx: the model is empty \(no graph, no opset\)"),
    "hidden_size_10000": (
        _lstm({"hidden_size": 10000}), "ValueError",
        r"LSTM node 'lstm': input R: expected shape \(1, 4\*H, H\) = \(1, 40000, 10000\) "
        r".*hidden_size 10000.*got \(1, 8, 2\)"),
    "hidden_size_int64_max": (
        _lstm({"hidden_size": 2**63 - 1}), "ValueError",
        r"LSTM node 'lstm': input R: expected shape .*got \(1, 8, 2\)"),
    "huge_dims_little_data": (
        _lstm(tensors=[_tensor("W", [1, 8, 2**40], raw=F32 * 24), _weights()[1]]),
        "ValueError", r"LSTM node 'lstm': input W: .*holds 96 bytes of data, expected "
                      r"8796093022208 values \(1, 8, 1099511627776\) of 4 bytes"),
    "dims_overflow_int64": (   # 8 * (2**61 + 3) wraps to 24 in int64
        _lstm(tensors=[_tensor("W", [1, 8, 2**61 + 3], raw=F32 * 24), _weights()[1]]),
        "ValueError", r"LSTM node 'lstm': input W: .*holds 96 bytes of data, expected "
                      r"18446744073709551640 values"),
    "negative_dims": (
        _lstm(tensors=[_tensor("W", [1, -8, 3], raw=b""), _weights()[1]]),
        "ValueError", r"LSTM node 'lstm': input W: expected shape \(1, 4\*H, D\) = "
                      r"\(1, 8, D\).*got \(1, -8, 3\)"),
    "typed_data_short": (
        _lstm(tensors=[_tensor("W", [1, 8, 3], float_data=[0.5] * 5), _weights()[1]]),
        "ValueError", r"LSTM node 'lstm': input W: .*holds 5 values, expected 24"),
    "external_data_beside": (
        _external("weights.bin"), "ValueError",
        r"LSTM node 'ext': input W: initializer 'W' keeps its data outside the model "
        r"\(external data\)"),
    "external_data_escaping": (
        _external("../../../../etc/passwd"), "ValueError",
        r"LSTM node 'ext': input W: .*\(external data\)"),
    "string_tensor": (
        _lstm(tensors=[_tensor("W", [1, 8, 3], TensorProto.STRING,
                               string_data=[b"w"] * 24), _weights()[1]]),
        "TypeError", r"LSTM node 'lstm': input W: data type STRING"),
    "complex_tensor": (
        _lstm(tensors=[_tensor("W", [1, 8, 3], TensorProto.COMPLEX64, raw=F32 * 48),
                       _weights()[1]]),
        "TypeError", r"LSTM node 'lstm': input W: data type COMPLEX64"),
    "bool_tensor": (
        _lstm(tensors=[_tensor("W", [1, 8, 3], TensorProto.BOOL, raw=b"\x01" * 24),
                       _weights()[1]]),
        "TypeError", r"LSTM node 'lstm': input W: data type BOOL"),
    "unknown_data_type": (
        _lstm(tensors=[_tensor("W", [1, 8, 3], 99, raw=F32 * 24), _weights()[1]]),
        "ValueError", r"LSTM node 'lstm': input W: unknown data type 99"),
    "undefined_data_type": (
        _lstm(tensors=[_tensor("W", [1, 8, 3], 0, raw=F32 * 24), _weights()[1]]),
        "ValueError", r"LSTM node 'lstm': input W: unknown data type 0"),
    "hidden_size_float": (_lstm({"hidden_size": 4.7}), "TypeError",
                          r"LSTM node 'lstm': attribute hidden_size: expected an int, got a "
                          r"float \(4.7"),
    "hidden_size_string": (_lstm({"hidden_size": "4"}), "TypeError",
                           r"attribute hidden_size: expected an int, got a string \('4'\)"),
    "hidden_size_list": (_lstm({"hidden_size": [2, 2]}), "TypeError",
                         r"attribute hidden_size: expected an int, got a list of ints"),
    "hidden_size_tensor": (_lstm({"hidden_size": _int64s("h", [2])}), "TypeError",
                           r"attribute hidden_size: expected an int, got a tensor"),
    "hidden_size_zero": (_lstm({"hidden_size": 0}), "ValueError",
                         r"attribute hidden_size: expected a positive int, got 0"),
    "hidden_size_negative": (_lstm({"hidden_size": -3}), "ValueError",
                             r"attribute hidden_size: expected a positive int, got -3"),
    "hidden_size_twice": (
        _lstm({"hidden_size": helper.make_attribute("hidden_size", 2),
               "h2": helper.make_attribute("hidden_size", 2)}),
        "ValueError", r"attribute hidden_size: given 2 times"),
    "direction_int": (_lstm({"hidden_size": 2, "direction": 1}), "TypeError",
                      r"attribute direction: expected a string, got an int \(1\)"),
    "unknown_attribute": (_lstm({"hidden_size": 2, "sneaky": 1}), "ValueError",
                          r"attribute 'sneaky': not an attribute of ONNX LSTM"),
    "activations_ints": (_lstm({"hidden_size": 2, "activations": [1, 2, 3]}), "TypeError",
                         r"attribute activations: expected a list of strings, got a list of "
                         r"ints"),
    "activations_count": (_lstm({"hidden_size": 2, "activations": ["Sigmoid", "Tanh"]}),
                          "ValueError", r"attribute activations: expected 3 names \(3 per "
                                        r"direction\), got 2"),
    "bidirectional_one_direction_W": (
        _lstm({"hidden_size": 2, "direction": "bidirectional"}), "ValueError",
        r"LSTM node 'lstm': input R: expected shape \(2, 4\*H, H\) = \(2, 8, 2\) "
        r"\(direction 'bidirectional', hidden_size 2\), got \(1, 8, 2\)"),
    "scalar_W": (
        _lstm(tensors=[_tensor("W", [], raw=F32), _weights()[1]]), "ValueError",
        r"LSTM node 'lstm': input W: expected shape \(1, 4\*H, D\) = \(1, 8, D\) .*got \(\)"),
    "vector_B": (
        _lstm(inputs=("X", "W", "R", "B"),
              tensors=_weights() + [_tensor("B", [16], raw=F32 * 16)]), "ValueError",
        r"LSTM node 'lstm': input B: expected shape \(1, 8\*H\) = \(1, 16\) .*got \(16,\)"),
    "indivisible_gate_rows": (
        _lstm({}, tensors=[_tensor("W", [1, 7, 3], raw=F32 * 21),
                           _tensor("R", [1, 7, 2], raw=F32 * 14)]), "ValueError",
        r"LSTM node 'lstm': input R: expected shape \(1, 4\*H, H\) \(direction 'forward', "
        r"H >= 1\), got \(1, 7, 2\)"),
    "gru_rows_for_lstm": (
        _lstm(op="GRU", tensors=_weights(G=4)), "ValueError",
        r"GRU node 'lstm': input R: expected shape \(1, 3\*H, H\) = \(1, 6, 2\)"),
    "missing_W": (_lstm(inputs=("X",)), "ValueError",
                  r"LSTM node 'lstm': input W: missing \(the node has 1 input\)"),
    "empty_W_name": (_lstm(inputs=("X", "", "R")), "ValueError",
                     r"LSTM node 'lstm': input W: missing"),
    "missing_X": (_lstm(inputs=("", "W", "R")), "ValueError",
                  r"LSTM node 'lstm': input X: missing"),
    "too_many_inputs": (_lstm(inputs=("X", "W", "R", "", "", "", "", "", "Z")), "ValueError",
                        r"LSTM node 'lstm': expected at most 8 inputs .*got 9"),
    "too_many_outputs": (_lstm(outputs=("Y", "Yh", "Yc", "Yd")), "ValueError",
                         r"LSTM node 'lstm': expected at most 3 outputs .*got 4"),
    "no_name_no_outputs": (_lstm(inputs=("X",), outputs=(), name=""), "ValueError",
                           r"LSTM node number 0: input W: missing"),
    "weight_not_initializer": (_lstm(tensors=_weights()[1:]), "ValueError",
                               r"LSTM node 'lstm': input W: 'W' is not an initializer"),
    "sparse_weight": (_sparse_weight(), "ValueError",
                      r"LSTM node 'sparse': input W: 'W' is a sparse initializer"),
    "duplicate_initializer": (_lstm(tensors=_weights() + _weights(seed=1)[:1]), "ValueError",
                              r"LSTM node 'lstm': input W: 2 initializers are named 'W'"),
    "nan_weights": (_nan_weights(), "ValueError",
                    r"LSTM node 'lstm': input R: non-finite values \(NaN or inf\)"),
    "invalid_utf8_name": (_invalid_utf8_name(), "TypeError",
                          r"LSTM node b'NA\\xff\\xfe\\xfdMRK': attribute hidden_size: expected "
                          r"an int, got a float"),
    "long_invalid_utf8_name": (_invalid_utf8_name(b"\xff" * 5000), "TypeError",
                               r"LSTM node b'(\\xff){30}\.\.\.(\\xff){30}': attribute "
                               r"hidden_size"),
    "custom_domain_lstm": (
        _lstm(domain="com.example"), "ValueError",
        r"from_onnx: unsupported op 'com.example.LSTM' \(node 'lstm'\)"),
    "many_nodes_last_bad": (_many_nodes(3000, last_hidden_size=3), "ValueError",
                            r"LSTM node 'n2999': input R: expected shape \(1, 4\*H, H\) = "
                            r"\(1, 12, 3\)"),
    "too_many_layers": (_many_nodes(5000), "ValueError",
                        r"from_onnx: the 5000 recurrent nodes would build layers of "
                        r"[0-9.]+ MiB, more than the limit"),
    "deep_identity_chain": (_batch_first_time_major_out(3000), "ValueError",
                            r"LSTM node 'deep': output Y: the node reads X batch-first"),
    "huge_shape_constant": (_huge_shape_constant(), "ValueError",
                            r"LSTM node 'huge_shape': output Y: the node reads X batch-first"),
    "nested_subgraphs": (_nested_subgraphs(2000), "ValueError",
                         r"from_onnx: cannot read an ONNX model"),
    "cycle": (_cycle(), "ValueError", r"LSTM node '[ab]': .*cycle"),
    "chain_width_mismatch": (_chain_width_mismatch(), "ValueError",
                             r"LSTM node 'b': input W: expected input size D = 2 \(X is the "
                             r"output of LSTM node 'a', of width dirs \* H\), got D = 3"),
    "dev_zero": ("/dev/zero", "ValueError",
                 r"from_onnx: cannot read an ONNX model from '/dev/zero': not a regular file"),
}


@pytest.fixture(scope="module")
def corpus_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    W = numpy_helper.to_array(_weights()[0])
    (folder / "weights.bin").write_bytes(W.tobytes())   # what external_data_beside names
    jobs = []
    for name, (content, _, _) in CORPUS.items():
        if isinstance(content, bytes):
            path = folder / f"{name}.onnx"
            path.write_bytes(content)
            content = str(path)
        jobs.append((name, content))
    jobs.append(("directory", str(folder)))
    try:
        package = os.path.dirname(os.path.dirname(os.path.abspath(fastrnn.__file__)))
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(jobs),
                               str(MEMORY_HEADROOM), package], cwd=folder,
                              capture_output=True, text=True, timeout=CHILD_TIMEOUT)
        stdout, stderr = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        stderr = f"child timed out after {CHILD_TIMEOUT} s"
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    results = {line["name"]: line for line in lines if "name" in line}
    return results, stderr[-3000:]


def test_corpus_files_are_small():
    sizes = {name: len(content) for name, (content, _, _) in CORPUS.items()
             if isinstance(content, bytes)}
    assert max(sizes.values()) < 400_000, sizes
    assert sizes["hidden_size_10000"] < 1000


@pytest.mark.parametrize("name", list(CORPUS) + ["directory"])
def test_hostile_file_is_refused_quickly(name, corpus_results):
    results, stderr = corpus_results
    assert name in results, f"no result for {name}; child stderr:\n{stderr}"
    got = results[name]
    if name == "directory":
        kind, pattern = "ValueError", r"from_onnx: cannot read an ONNX model from '.*'"
    else:
        _, kind, pattern = CORPUS[name]
    assert (got["type"], got["seconds"] < SECONDS_PER_CALL) == (kind, True), got
    assert re.search(pattern, got["message"]), (pattern, got["message"])
