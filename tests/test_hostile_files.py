"""A corpus of damaged and hostile model files: each must give a quick
ValueError naming what is wrong, in bounded time and memory.

Every file is loaded in ONE child process whose address space is limited
(RLIMIT_AS) to a modest bound above what importing fastrnn takes, and the
child times each load. A loader that allocates what a file claims before
checking it, or inflates a zip bomb, fails here with a MemoryError or by
taking too long; one that lets a raw exception through fails on its type.
"""
import io
import json
import re
import struct
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

import fastrnn

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="measures the address space through /proc")

# what the child may map beyond its size after importing fastrnn
MEMORY_BOUND = 256 << 20
SECONDS_PER_LOAD = 1.0
FORMAT = "fastrnn.Sequential/1"


# --- building files -------------------------------------------------------------------------
def _jsonable(config):
    return {k: (v.name if isinstance(v, np.dtype) else v) for k, v in config.items()}


def _model():
    return fastrnn.Sequential([fastrnn.LSTM(3, 4, batch_first=True, seed=0), fastrnn.LastStep(),
                               fastrnn.Linear(4, 2, seed=1)])


def _entries(model):
    return [{"class": type(layer).__name__, "config": _jsonable(layer._config)}
            for layer in model.layers]


def _config(entries):
    return {"format": FORMAT, "fastrnn_version": fastrnn.__version__, "layers": entries}


def _npz(path, config, arrays, raw_config=None):
    """A file as save writes it, from a config (dict or raw JSON text) and arrays."""
    text = raw_config if raw_config is not None else json.dumps(config)
    np.savez(path, config=np.array(text), **{f"weights/{k}": v for k, v in arrays.items()})


def _good_arrays():
    return _model().state_dict()


def _changed(index, **changes):
    """The good model's file with layer `index`'s configuration changed."""
    entries = _entries(_model())
    entries[index]["config"].update(changes)
    return lambda path: _npz(path, _config(entries), _good_arrays())


def _npy_bytes(array):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, allow_pickle=False)
    return buf.getvalue()


def _npy_header(shape, descr, fortran_order=False):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": fortran_order,
                                               "shape": shape})
    return buf.getvalue()


def _zip(path, members, compression=zipfile.ZIP_STORED):
    """members: (name or ZipInfo, bytes) pairs, written as they are."""
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members:
            zf.writestr(name, data)


def _config_member(config):
    return ("config.npy", _npy_bytes(np.array(json.dumps(config))))


def _good_members(drop=()):
    members = [_config_member(_config(_entries(_model())))]
    members += [(f"weights/{k}.npy", _npy_bytes(v)) for k, v in _good_arrays().items()
                if k not in drop]
    return members


def _bomb(path, name, shape, extra_members=(), config=None):
    """A member `name` of zeros (a valid .npy of `shape`, float32) deflated."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for member, data in extra_members:
            zf.writestr(member, data)
        if config is not None:
            zf.writestr(*_config_member(config))
        info = zipfile.ZipInfo(name)
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w", force_zip64=True) as out:
            out.write(_npy_header(shape, "<f4"))
            zeros = bytes(16 << 20)
            left = int(np.prod(shape)) * 4
            while left:
                out.write(zeros[:min(left, len(zeros))])
                left -= min(left, len(zeros))


def _bomb_weight(path):
    linear = {"class": "Linear", "config": {"in_features": 8192, "out_features": 8192,
                                            "bias": False, "dtype": "float32"}}
    _bomb(path, "weights/0.weight.npy", (8192, 8192), config=_config([linear]))


def _bomb_extra_member(path):
    _bomb(path, "weights/9.weight.npy", (4096, 4096), extra_members=_good_members())


def _lying_weight_header(path):
    linear = {"class": "Linear", "config": {"in_features": 100000, "out_features": 100000,
                                            "bias": False, "dtype": "float32"}}
    _zip(path, [_config_member(_config([linear])),
                ("weights/0.weight.npy", _npy_header((100000, 100000), "<f4") + bytes(24))])


def _lying_config_header(path):
    _zip(path, [("config.npy", _npy_header((), "<U500000000") + b"{}".ljust(64, b"\0"))]
         + _good_members()[1:])


def _truncated(fraction=None, cut=None):
    def make(path):
        _npz(path, _config(_entries(_model())), _good_arrays())
        data = path.read_bytes()
        path.write_bytes(data[:int(len(data) * fraction)] if fraction else data[:-cut])
    return make


def _corrupted_weight_data(path):
    _npz(path, _config(_entries(_model())), _good_arrays())
    data = bytearray(path.read_bytes())
    header = _npy_header((2, 4), "<f4")
    at = data.index(header) + len(header)          # Linear's weight: the first (2, 4) array
    data[at + 5] ^= 0xFF
    path.write_bytes(bytes(data))


def _sizes_lie(path):
    """The central directory claims 2 GiB for every member."""
    _npz(path, _config(_entries(_model())), _good_arrays())
    data = bytearray(path.read_bytes())
    at = data.find(b"PK\x01\x02")
    while at >= 0:
        data[at + 20:at + 28] = struct.pack("<2L", 2**31, 2**31)
        at = data.find(b"PK\x01\x02", at + 4)
    path.write_bytes(bytes(data))


def _deep_json(depth):
    return "[" * depth + "]" * depth


def _deep_in_layer(path):
    entries = _entries(_model())
    entries[0]["config"]["input_size"] = "@"
    text = json.dumps(_config(entries)).replace('"@"', _deep_json(100000))
    _npz(path, None, _good_arrays(), raw_config=text)


def _deep_in_dtype(path):
    """Nested just within what json parses: deeper than a repr in a message may go."""
    entries = _entries(_model())
    entries[2]["config"]["dtype"] = "@"
    text = json.dumps(_config(entries)).replace('"@"', _deep_json(980))
    _npz(path, None, _good_arrays(), raw_config=text)


def _huge_config(path):
    text = json.dumps(_config(_entries(_model())))
    _npz(path, None, _good_arrays(), raw_config=text[:-1] + " " * (2 << 20) + "}")


def _many_members(path):
    _zip(path, _good_members() + [(f"weights/x{i}.npy", b"") for i in range(20000)])


def _big_directory(path):
    members = []
    for i in range(3000):
        info = zipfile.ZipInfo(f"weights/{i}.w.npy")
        info.comment = b"c" * 1000
        members.append((info, b""))
    _zip(path, _good_members() + members)


def _member_with(name, data):
    return lambda path: _zip(path, _good_members() + [(name, data)])


def _member_replaced(name, data):
    return lambda path: _zip(path, [(member, data if member == name else old)
                                    for member, old in _good_members()])


def _lzma_member(path):
    members = _good_members()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members[:-1]:
            zf.writestr(name, data)
        zf.writestr(members[-1][0], members[-1][1], compress_type=zipfile.ZIP_LZMA)


def _encrypted_member(path):
    """The last member marked encrypted (zipfile writes no encryption)."""
    _zip(path, _good_members())
    data = bytearray(path.read_bytes())
    name = b"weights/2.bias.npy"
    for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.rindex(signature, 0, data.rindex(name))
        data[at + flags_at] |= 0x1
    path.write_bytes(bytes(data))


def _duplicate_member(path):
    members = _good_members()
    with pytest.warns(UserWarning, match="Duplicate name"):
        _zip(path, members + [members[-1]])


def _weights(**replace):
    def make(path):
        arrays = _good_arrays()
        for key, value in replace.items():
            key = key.replace("__", ".")
            if value is None:
                del arrays[key]
            else:
                arrays[key] = value
        _npz(path, _config(_entries(_model())), arrays)
    return make


def _write_npy(path):
    with open(path, "wb") as f:
        np.save(f, np.zeros(3))


def _config_entries(entries):
    return lambda path: _npz(path, _config(entries), _good_arrays())


# name -> (builder, regex the ValueError's message must match); None: loads
CASES = {
    "good": (lambda path: _model().save(path), None),
    "huge_hidden_size": (_changed(0, hidden_size=10000),
                         r"layer 0 \(LSTM, input_size=3, hidden_size=10000, num_layers=1, "
                         r"bias=True, bidirectional=False\) calls for 4 arrays of 400,200,000 "
                         r"values, but the file holds 4 arrays of 144 values for it"),
    "huge_hidden_size_20000": (_changed(0, hidden_size=20000),
                               r"hidden_size=20000.* calls for 4 arrays of 1,600,400,000 "
                               r"values, but the file holds 4 arrays of 144"),
    "huge_num_layers": (_changed(0, num_layers=100000),
                        r"num_layers=100000, .* calls for 400,000 arrays of [0-9,]+ values, "
                        r"but the file holds 4 arrays of 144"),
    "huge_linear": (_changed(2, in_features=10**9, out_features=10**9),
                    r"layer 2 \(Linear, in_features=1000000000, out_features=1000000000, "
                    r"bias=True\) calls for 2 arrays of 1,000,000,001,000,000,000 values"),
    "zip_bomb_weight": (_bomb_weight,
                        r"member 'weights/0.weight.npy' would inflate from [0-9,]+ to "
                        r"268,435,584 bytes \(ratio [0-9,]+:1, more than 100:1\): a zip bomb"),
    "zip_bomb_extra_member": (_bomb_extra_member,
                              r"member 'weights/9.weight.npy' would inflate .* a zip bomb"),
    "lying_npy_header": (_lying_weight_header,
                         r"member 'weights/0.weight.npy': its header declares shape "
                         r"\(100000, 100000\) of float32 \(40,000,000,000 bytes\), but the "
                         r"member holds 24 bytes of data"),
    "lying_config_header": (_lying_config_header,
                            r"member 'config.npy': its header declares shape \(\) of <U500000000 "
                            r"\(2,000,000,000 bytes\), but the member holds 64"),
    "truncated_half": (_truncated(fraction=0.5),
                       r"not a complete zip archive \(no end-of-central-directory record"),
    "truncated_tail": (_truncated(cut=30),
                       r"not a complete zip archive \(no end-of-central-directory record"),
    "corrupted_weight_data": (_corrupted_weight_data, r"BadZipFile: Bad CRC-32"),
    "sizes_lie": (_sizes_lie, r"member 'config.npy' declares 2,147,483,648 compressed bytes, "
                              r"more than the file's [0-9,]+"),
    "random_bytes": (lambda path: path.write_bytes(
        np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()),
        r"it is not a zip \(.npz\) archive"),
    "random_bytes_after_zip_magic": (lambda path: path.write_bytes(
        b"PK\x03\x04" + np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8)
        .tobytes()), r"not a complete zip archive"),
    "empty": (lambda path: path.write_bytes(b""), r"the file is empty"),
    "npy_file": (_write_npy, r"it holds a single .npy array, not a fastrnn model \(.npz\)"),
    "deep_json": (lambda path: _npz(path, None, _good_arrays(), raw_config=_deep_json(200000)),
                  r"its configuration \(JSON\) is nested too deeply"),
    "deep_json_in_layer": (_deep_in_layer, r"its configuration \(JSON\) is nested too deeply"),
    "deep_json_in_dtype": (_deep_in_dtype, r"its configuration \(JSON\) is nested too deeply "
                                           r"\(more than 8 levels\)"),
    "huge_integer": (_changed(0, hidden_size=10**4000),
                     r"layer 0 \(LSTM, input_size=3, hidden_size=about 10\^4000, .*\) calls for "
                     r"4 arrays of about 10\^8000 values, but the file holds 4 arrays of 144"),
    "shallow_list_for_an_int": (_changed(0, input_size=[[[[1]]]]),
                                r"layer 0 \(LSTM\) has a bad configuration: LSTM: input_size "
                                r"must be an int, got list"),
    "huge_config": (_huge_config, r"its configuration has 2,097,[0-9]+ characters, more than "
                                  r"1,048,576"),
    "config_not_json": (lambda path: _npz(path, None, _good_arrays(), raw_config="{nope"),
                        r"its configuration is not valid JSON \(Expecting property name"),
    "config_a_number": (lambda path: _zip(path, [("config.npy", _npy_bytes(np.array(5.0)))]),
                        r"member 'config.npy' holds float64 data, not the configuration's "
                        r"JSON text"),
    "config_a_list": (lambda path: _npz(path, None, _good_arrays(), raw_config="[1, 2]"),
                      r"its configuration should be a JSON object, got list"),
    "wrong_format": (lambda path: _npz(path, dict(_config(_entries(_model())), format="keras"),
                                       _good_arrays()),
                     r"its 'format' should be 'fastrnn/2' or 'fastrnn.Sequential/1', got "
                     r"'keras'"),
    # a later fastrnn's format says so, with the version that wrote it
    "newer_format": (lambda path: _npz(path, dict(_config(_entries(_model())), format="fastrnn/3",
                                                  fastrnn_version="0.2.0"), _good_arrays()),
                     r"it was written by a newer fastrnn '0.2.0' in format 'fastrnn/3', which "
                     r"this fastrnn [0-9.]+ \(format 'fastrnn/2'\) does not read; upgrade"),
    # (more digits than Python's int() takes: said all the same)
    "newer_format_of_many_digits": (
        lambda path: _npz(path, dict(_config(_entries(_model())), format="fastrnn/" + "9" * 5000),
                          _good_arrays()),
        r"it was written by a newer fastrnn '[0-9.]+' in format 'fastrnn/999"),
    "no_config": (lambda path: _zip(path, _good_members()[1:]),
                  r"it has no configuration \(member 'config.npy'\)"),
    "layers_a_dict": (lambda path: _npz(path, dict(_config([]), layers={"0": 1}), {}),
                      r"its 'layers' should be a non-empty list, got \{'0': 1\}"),
    "layers_empty": (lambda path: _npz(path, _config([]), {}),
                     r"its 'layers' should be a non-empty list, got \[\]"),
    "hidden_size_a_string": (_changed(0, hidden_size="4"),
                             r"layer 0 \(LSTM\) has a bad configuration: LSTM: hidden_size must "
                             r"be an int, got str"),
    "num_layers_a_float": (_changed(0, num_layers=2.5),
                           r"LSTM: num_layers must be an int, got float"),
    "negative_hidden_size": (_changed(0, hidden_size=-4),
                             r"LSTM: hidden_size must be >= 1, got -4"),
    "bias_a_string": (_changed(2, bias="yes"), r"layer 2 \(Linear\) has a bad configuration: "
                                               r"Linear: bias must be a bool, got str"),
    "unknown_argument": (_changed(2, evil=1),
                         r"layer 2 \(Linear\) has a bad configuration: got an unexpected "
                         r"keyword argument 'evil'"),
    "bad_dtype": (_changed(2, dtype="float16"),
                  r"layer 2 \(Linear\) has a bad configuration: Linear: dtype must be "
                  r"'float32' or 'float64', got 'float16'"),
    "config_a_list_for_a_known_class": (_config_entries([{"class": "LSTM", "config": []}]),
                                        r"layer 0 \(LSTM\) has a bad configuration: 'config' "
                                        r"must be a JSON object of constructor arguments"),
    "unknown_class": (_config_entries([{"class": "os.system", "config": {}}]),
                      r"layer 0 names an unknown class 'os.system'"),
    "missing_weight": (_weights(**{"0__bias_hh_l0": None}),
                       r"layer 0 \(LSTM, .*\) calls for 4 arrays of 144 values, but the file "
                       r"holds 3 arrays of 128 values for it"),
    "renamed_weight": (_weights(**{"0__bias_hh_l0": None, "0__bias_hh_l9": np.zeros(16)}),
                       r"layer 0 \(LSTM\): missing weights \['bias_hh_l0'\], unexpected "
                       r"weights \['bias_hh_l9'\]"),
    "weight_for_a_stateless_layer": (_weights(**{"1__weight": np.zeros(3)}),
                                     r"layer 1 \(LastStep\) calls for 0 arrays of 0 values, but "
                                     r"the file holds 1 array of 3 values for it"),
    "weight_of_no_layer": (_weights(**{"7__weight": np.zeros(3), "junk": np.zeros(1)}),
                           r"it holds weights \['7.weight', 'junk'\] that belong to none of its "
                           r"3 layers"),
    "nan_weights": (_weights(**{"2__weight": np.full((2, 4), np.nan)}),
                    r"layer 2 \(Linear\): Linear: weight has non-finite values"),
    "string_weights": (_weights(**{"2__weight": np.full((2, 4), "x")}),
                       r"member 'weights/2.weight.npy' holds <U1 data; weights must be "
                       r"float32 or float64"),
    "integer_weights": (_weights(**{"2__weight": np.ones((2, 4), np.int64)}),
                        r"member 'weights/2.weight.npy' holds int64 data; weights must be "
                        r"float32 or float64"),
    "object_weights": (_member_replaced("weights/2.weight.npy",
                                        _npy_header((2, 4), "|O") + bytes(64)),
                       r"member 'weights/2.weight.npy' holds object data \(pickle\)"),
    "negative_shape": (_member_with("weights/5.w.npy", _npy_header((-2, 3), "<f4")),
                       r"member 'weights/5.w.npy': its header declares the negative shape "
                       r"\(-2, 3\)"),
    "header_too_long": (_member_with("weights/5.w.npy", b"\x93NUMPY\x01\x00\xff\xff"
                                     + b" " * 65535),
                        r"member 'weights/5.w.npy' has a damaged .npy header"),
    "not_npy": (_member_with("weights/5.w.npy", b"hello"),
                r"member 'weights/5.w.npy' has a damaged .npy header"),
    "foreign_member": (_member_with("readme.txt", b"hello"),
                       r"it holds a member 'readme.txt' that is neither the configuration nor "
                       r"a weight or optimizer array"),
    "many_members": (_many_members, r"it has 20,00[0-9] members, more than 10,000"),
    "big_directory": (_big_directory, r"its zip directory takes [0-9,]+ bytes, more than "
                                      r"2,097,152"),
    "lzma_member": (_lzma_member, r"member 'weights/2.bias.npy' uses compression method 14; "
                                  r"only stored \(0\) and deflated \(8\) members are read"),
    "encrypted_member": (_encrypted_member, r"member 'weights/2.bias.npy' is encrypted"),
    "duplicate_member": (_duplicate_member, r"it holds the member 'weights/2.bias.npy' twice"),
}


# --- files with training state (format 2): the optimizer's arrays and configuration ------------
def _trained(bidirectional=False):
    """A compiled model trained one epoch: its file holds Adam's moments and steps,
    a schedule, the metrics and the random states."""
    dirs = 2 if bidirectional else 1
    model = fastrnn.Sequential([
        fastrnn.LSTM(3, 4, batch_first=True, bidirectional=bidirectional, seed=0),
        fastrnn.LastStep(bidirectional=bidirectional),
        fastrnn.Linear(4 * dirs, 2, seed=1)], seed=2)
    model.compile("mse", fastrnn.optim.Adam(lr=0.01), metrics=["mae"])
    fastrnn.optim.StepLR(model.optimizer, step_size=2)
    rng = np.random.default_rng(0)
    model.fit(rng.standard_normal((8, 5, 3)), rng.standard_normal((8, 2)), batch_size=4,
              verbose=0, callbacks=model.optimizer.schedules)
    return model


def _v2(edit=None, drop=(), add=(), replace=None, bidirectional=False):
    """The trained model's file with its configuration edited (edit(config)),
    members dropped, added or replaced."""
    def make(path):
        _trained(bidirectional).save(path)
        with zipfile.ZipFile(path) as zf:
            members = [(name, zf.read(name)) for name in zf.namelist()]
        out = []
        for name, data in members:
            if name in drop:
                continue
            if name == "config.npy" and edit is not None:
                config = json.loads(str(np.load(io.BytesIO(data))[()]))
                edit(config)
                data = _npy_bytes(np.array(json.dumps(config)))
            out.append((name, (replace or {}).get(name, data)))
        _zip(path, out + list(add))
    return make


def _edit_optimizer(**changes):
    def edit(config):
        config["training"]["optimizer"].update(changes)
    return edit


def _edit(path, value):
    """Set config[path[0]][path[1]]... to value."""
    def edit(config):
        node = config
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


def _drop_optimizer_layers(config):   # a file saved before the optimizer named its layers
    del config["training"]["optimizer"]["layers"]


def _drop_scalars(config):
    del config["training"]["optimizer"]["scalars"]["2.bias"]


def _no_training(config):
    config["training"] = None


V2_CASES = {
    "v2_good": (_v2(), None),
    "v2_good_bidirectional": (_v2(bidirectional=True), None),
    "optimizer_array_wrong_shape": (
        _v2(replace={"optimizer/2.weight.exp_avg.npy": _npy_bytes(np.zeros((4, 2), "<f4"))}),
        r"optimizer array '2.weight.exp_avg' is \(4, 2\) of float32; its parameter is "
        r"\(2, 4\) of float32"),
    "optimizer_array_wrong_dtype": (
        _v2(replace={"optimizer/2.weight.exp_avg.npy": _npy_bytes(np.zeros((2, 4), "<f8"))}),
        r"optimizer array '2.weight.exp_avg' is \(2, 4\) of float64; its parameter is "
        r"\(2, 4\) of float32"),
    "optimizer_array_lying_header": (
        _v2(replace={"optimizer/2.weight.exp_avg.npy": _npy_header((100000, 100000), "<f4")
                     + bytes(32)}),
        r"member 'optimizer/2.weight.exp_avg.npy': its header declares shape \(100000, "
        r"100000\) of float32 \(40,000,000,000 bytes\), but the member holds 32 bytes"),
    "optimizer_array_bomb": (
        lambda path: _bomb(path, "optimizer/2.weight.exp_avg.npy", (4096, 4096),
                           extra_members=_good_members()),
        r"member 'optimizer/2.weight.exp_avg.npy' would inflate .* a zip bomb"),
    "optimizer_array_of_no_parameter": (
        _v2(add=[("optimizer/2.nope.exp_avg.npy", _npy_bytes(np.zeros(2, "<f4")))]),
        r"it holds the optimizer array '2.nope.exp_avg', which is no slot \['exp_avg', "
        r"'exp_avg_sq'\] of a parameter of its layers"),
    "optimizer_array_of_a_stateless_layer": (
        _v2(add=[("optimizer/1.weight.exp_avg.npy", _npy_bytes(np.zeros(2, "<f4")))]),
        r"it holds the optimizer array '1.weight.exp_avg', which is no slot"),
    "optimizer_array_unknown_slot": (
        _v2(add=[("optimizer/2.bias.momentum_buffer.npy", _npy_bytes(np.zeros(2, "<f4")))]),
        r"it holds the optimizer array '2.bias.momentum_buffer', which is no slot"),
    "optimizer_array_of_layer_99": (
        _v2(add=[("optimizer/99.bias.exp_avg.npy", _npy_bytes(np.zeros(2, "<f4")))]),
        r"it holds the optimizer array '99.bias.exp_avg', which is no slot"),
    "optimizer_slot_missing": (
        _v2(drop=("optimizer/2.weight.exp_avg_sq.npy",)),
        r"layer 2's weight has optimizer arrays \['exp_avg'\]; a Adam with this configuration "
        r"keeps \['exp_avg', 'exp_avg_sq'\]"),
    "optimizer_half_of_a_shared_array": (
        _v2(bidirectional=True, drop=("optimizer/0.weight_ih_l0_reverse.exp_avg.npy",
                                      "optimizer/0.weight_ih_l0_reverse.exp_avg_sq.npy"),
            edit=lambda c: c["training"]["optimizer"]["scalars"].pop("0.weight_ih_l0_reverse")),
        r"layer 0 has optimizer state for \['weight_ih_l0'\] but not for "
        r"\['weight_ih_l0_reverse'\], which share one array of parameters"),
    "optimizer_arrays_without_configuration": (
        _v2(edit=_no_training),
        r"it holds optimizer arrays \(\['0.bias_hh_l0.exp_avg', .*\) but no optimizer "
        r"configuration"),
    "optimizer_unknown_class": (_v2(edit=_edit_optimizer(**{"class": "os.system"})),
                                r"its optimizer names an unknown class 'os.system'"),
    "optimizer_bad_config": (
        _v2(edit=_edit(["training", "optimizer", "config", "betas"], [0.9, 2.0])),
        r"its optimizer \(Adam\) has a bad configuration: Adam: betas must lie in"),
    "optimizer_unknown_argument": (
        _v2(edit=_edit(["training", "optimizer", "config", "evil"], 1)),
        r"its optimizer \(Adam\) has a bad configuration: .*unexpected keyword argument "
        r"'evil'"),
    "optimizer_scalars_missing": (
        _v2(edit=_drop_scalars),
        r"its optimizer keeps \['step'\] per parameter, missing for \['2.bias'\]"),
    "optimizer_step_not_an_int": (
        _v2(edit=_edit(["training", "optimizer", "scalars", "2.bias", "step"], "many")),
        r"its optimizer state is bad: Adam.load_state_dict: state\[[0-9]+\]\['step'\] must "
        r"be an int >= 1, got 'many'"),
    "optimizer_huge_step_count": (
        _v2(edit=_edit_optimizer(step_count=-5)),
        r"its optimizer state is bad: .*step_count must be an int >= 0, got -5"),
    "optimizer_missing_keys": (
        _v2(edit=_edit(["training", "optimizer"], {"class": "Adam"})),
        r"its optimizer should be an object of \['class', 'config', 'scalars', 'schedules', "
        r"'step_count'\]"),
    "optimizer_layers_not_positions": (
        _v2(edit=_edit_optimizer(layers=["0"])),
        r"its optimizer's layers should be a list of distinct layer positions, got \['0'\]"),
    "optimizer_layers_repeated": (
        _v2(edit=_edit_optimizer(layers=[0, 0, 2])),
        r"its optimizer's layers should be a list of distinct layer positions, got \[0, 0, 2\]"),
    "optimizer_trains_a_layer_without_parameters": (
        _v2(edit=_edit_optimizer(layers=[0, 1, 2])),
        r"its optimizer trains layer 1, which holds no parameters \(the model has 3 layers\)"),
    "optimizer_trains_a_layer_past_the_model": (
        _v2(edit=_edit_optimizer(layers=[0, 2, 3])),
        r"its optimizer trains layer 3, which holds no parameters \(the model has 3 layers\)"),
    "optimizer_arrays_of_a_layer_it_does_not_train": (
        _v2(edit=_edit_optimizer(layers=[2])),
        r"it holds optimizer arrays of layer 0, which its optimizer does not train"),
    "optimizer_layers_absent": (_v2(edit=_drop_optimizer_layers), None),
    "schedule_unknown_class": (
        _v2(edit=_edit(["training", "optimizer", "schedules", 0, "class"], "Warmup")),
        r"its optimizer state is bad: .*schedules\[0\] names an unknown schedule 'Warmup'"),
    "schedule_bad_epoch": (
        _v2(edit=_edit(["training", "optimizer", "schedules", 0, "epoch"], -1)),
        r"schedules\[0\]\['epoch'\] must be an int >= 0, got -1"),
    "loss_unknown_class": (_v2(edit=_edit(["training", "loss", "class"], "Hinge")),
                           r"its loss should name one of \['BCEWithLogitsLoss', "),
    "loss_bad_config": (_v2(edit=_edit(["training", "loss", "config", "reduction"], "max")),
                        r"its loss \(MSELoss\) has a bad configuration: MSELoss: reduction "
                        r"must be 'mean', 'sum' or 'none', got 'max'"),
    "metric_unknown": (_v2(edit=_edit(["training", "metrics", 0, "name"], "f1")),
                       r"metric 0 is bad: metric: unknown metric 'f1'"),
    "clip_a_string": (_v2(edit=_edit(["training", "clip_grad_norm"], "1")),
                      r"its clip_grad_norm should be a number >= 0 or null, got '1'"),
    "random_unknown_bit_generator": (
        _v2(edit=_edit(["random", "generators", 0, "bit_generator"], "RandomState")),
        r"random generator 0 names an unknown bit generator 'RandomState'"),
    "random_bad_state": (
        _v2(edit=_edit(["random", "generators", 0, "state"], {"state": "x", "inc": 1})),
        r"random generator 0 \(PCG64\) has a bad state"),
    # numpy's setters check no ranges: these loaded and segfaulted at the next draw
    "random_mt19937_position_past_its_key": (
        _v2(edit=_edit(["random", "generators", 0], {
            "bit_generator": "MT19937", "state": {"key": list(range(624)), "pos": 2 ** 31 - 1}})),
        r"random generator 0 \(MT19937\) has a bad state: its 'pos' should be an int in "
        r"\[0, 624\], got 2147483647"),
    "random_mt19937_zero_key": (
        _v2(edit=_edit(["random", "generators", 0], {
            "bit_generator": "MT19937", "state": {"key": [0] * 624, "pos": 624}})),
        r"random generator 0 \(MT19937\) has a bad state: its 'key' is all zeros"),
    "random_philox_buffer_position_negative": (
        _v2(edit=_edit(["random", "generators", 0], {
            "bit_generator": "Philox", "state": {"counter": [0] * 4, "key": [0, 0]},
            "buffer": [0] * 4, "buffer_pos": -2 ** 31, "has_uint32": 0, "uinteger": 0})),
        r"random generator 0 \(Philox\) has a bad state: its 'buffer_pos' should be an int in "
        r"\[0, 4\], got -2147483648"),
    "random_sfc64_state_too_short": (
        _v2(edit=_edit(["random", "generators", 0], {
            "bit_generator": "SFC64", "state": {"state": [1, 2]}, "has_uint32": 0,
            "uinteger": 0})),
        r"random generator 0 \(SFC64\) has a bad state: its 'state' should be a list of 4 "
        r"ints"),
    "random_pcg64_state_a_float": (
        _v2(edit=_edit(["random", "generators", 0, "state", "state"], 1.5)),
        r"random generator 0 \(PCG64\) has a bad state: its 'state' should be an int"),
    "random_extra_field": (
        _v2(edit=_edit(["random", "generators", 0, "extra"], 1)),
        r"random generator 0 \(PCG64\) has a bad state: its fields should be "),
    "random_bad_reference": (_v2(edit=_edit(["random", "layers", 0], 7)),
                             r"layer 0's random generator should be the index of one of the "
                             r"[0-9] generators, got 7"),
    "random_for_a_layer_without": (_v2(edit=_edit(["random", "layers", 2], 0)),
                                   r"layer 2 \(Linear\) has a random generator in the file but "
                                   r"draws no random numbers"),
    "kind_unknown": (_v2(edit=_edit(["kind"], "Graph")),
                     r"its 'kind' should be 'Sequential' or 'layer', got 'Graph'"),
    "single_layer_of_two_layers": (_v2(edit=_edit(["kind"], "layer")),
                                   r"it is a single layer's file but lists 3 layers"),
    "cell_in_a_sequential": (
        _v2(edit=_edit(["layers", 0], {"class": "LSTMCell", "config": {
            "input_size": 3, "hidden_size": 4}})),
        r"layer 0 names an unknown class 'LSTMCell'"),
}
CASES.update(V2_CASES)


# --- files of wrapped layers: a wrapper's entry holds its options and the layer's entry ----------
def _wrapped_model(trained=False):
    """Keras' LSTM(go_backwards=True, stateful=True), LastStep, Linear."""
    model = fastrnn.Sequential([
        fastrnn.Stateful(fastrnn.Reversed(fastrnn.LSTM(3, 4, batch_first=True, seed=0),
                                          keep_order=False), batch_size=2),
        fastrnn.LastStep(), fastrnn.Linear(4, 2, seed=1)], seed=2)
    if trained:
        model.compile("mse", "adam")
        rng = np.random.default_rng(0)
        model.fit(rng.standard_normal((4, 5, 3)), rng.standard_normal((4, 2)), batch_size=2,
                  shuffle=False, verbose=0)
    return model


def _wrapped(edit=None, raw=None):
    """The wrapped model's file, its configuration edited (edit(config)) or
    its JSON text changed (raw(text))."""
    def make(path):
        _wrapped_model().save(path)
        with zipfile.ZipFile(path) as zf:
            members = [(name, zf.read(name)) for name in zf.namelist()]
        out = []
        for name, data in members:
            if name == "config.npy":
                text = str(np.load(io.BytesIO(data))[()])
                if edit is not None:
                    config = json.loads(text)
                    edit(config)
                    text = json.dumps(config)
                if raw is not None:
                    text = raw(text)
                data = _npy_bytes(np.array(text))
            out.append((name, data))
        _zip(path, out)
    return make


def _wrapped_once_more(config):
    entry = config["layers"][0]["layer"]
    entry["layer"] = {"class": "Reversed", "config": {}, "layer": entry["layer"]}


def _wrapped_deeply(text):
    """The LSTM's entry in 10,000 more Reversed entries (within the length bound)."""
    start = text.index('{"class": "LSTM"')
    end = text.index("}}", start) + 2
    depth = 10000
    return (text[:start] + '{"class": "Reversed", "config": {}, "layer": ' * depth
            + text[start:end] + "}" * depth + text[end:])


WRAPPED = ["layers", 0]              # the Stateful's entry
REVERSED = WRAPPED + ["layer"]       # the Reversed's
WRAPPED_CASES = {
    "wrapped_good": (_wrapped(), None),
    "wrapped_good_trained": (lambda path: _wrapped_model(trained=True).save(path), None),
    "wrapper_keep_order_a_string": (
        _wrapped(_edit(REVERSED + ["config", "keep_order"], "no")),
        r"layer 0 \(Reversed\) has a bad configuration: Reversed: keep_order must be a bool, "
        r"got str"),
    "wrapper_batch_size_zero": (
        _wrapped(_edit(WRAPPED + ["config", "batch_size"], 0)),
        r"layer 0 \(Stateful\) has a bad configuration: Stateful: batch_size must be >= 1, "
        r"got 0"),
    "wrapper_batch_size_a_float": (
        _wrapped(_edit(WRAPPED + ["config", "batch_size"], 2.5)),
        r"layer 0 \(Stateful\) has a bad configuration: Stateful: batch_size must be an int, "
        r"got float"),
    "wrapper_unknown_argument": (
        _wrapped(_edit(WRAPPED + ["config", "evil"], 1)),
        r"layer 0 \(Stateful\) has a bad configuration: got an unexpected keyword argument "
        r"'evil'"),
    "wrapper_layer_in_its_config": (
        _wrapped(_edit(REVERSED + ["config", "layer"], {"class": "GRU"})),
        r"layer 0 \(Reversed\) has a bad configuration: multiple values for argument 'layer'"),
    "wrapper_config_a_list": (
        _wrapped(_edit(WRAPPED + ["config"], [2])),
        r"layer 0 \(Stateful\) has a bad configuration: 'config' must be a JSON object of "
        r"constructor arguments, got list"),
    "wrapper_without_layer": (
        _wrapped(lambda config: config["layers"][0].pop("layer")),
        r"layer 0 \(Stateful\) should be an object of 'class', 'config' and 'layer' \(the "
        r"wrapped layer's entry\), got \['class', 'config'\]"),
    "wrapper_layer_a_string": (
        _wrapped(_edit(REVERSED, "LSTM")),
        r"layer 0 \(Stateful\): its 'layer' should be the wrapped layer's entry \(an "
        r"object\), got 'LSTM'"),
    "wrapper_of_a_linear": (
        _wrapped(_edit(REVERSED + ["layer"], {"class": "Linear", "config": {
            "in_features": 3, "out_features": 4}})),
        r"layer 0 \(Reversed\) wraps a Linear; a wrapper holds an RNN, GRU or LSTM"),
    "wrapper_of_an_unknown_class": (
        _wrapped(_edit(REVERSED + ["layer", "class"], "os.system")),
        r"layer 0 names an unknown class 'os.system'"),
    "wrapped_three_times": (
        _wrapped(_wrapped_once_more),
        r"layer 0 has more than 2 wrappers \(Stateful, Reversed, Reversed, \.\.\.\)"),
    "wrapped_deeply": (_wrapped(raw=_wrapped_deeply),
                       r"its configuration \(JSON\) is nested too deeply"),
    "layer_entry_in_a_plain_layer": (
        _wrapped(_edit(["layers", 2, "layer"], {"class": "LSTM", "config": {}})),
        r"layer 2 \(Linear\) has a 'layer' entry, which only a wrapper \(Reversed, "
        r"Stateful\) has"),
    "wrapped_huge_hidden_size": (
        _wrapped(_edit(REVERSED + ["layer", "config", "hidden_size"], 10000)),
        # the loader names the layer inside its wrappers
        r"layer 0 \(Stateful\(Reversed\(LSTM\)\), input_size=3, hidden_size=10000, .*\) calls "
        r"for 4 arrays of 400,200,000 values, but the file holds 4 arrays of 144 values for it"),
    "wrapped_missing_weight": (
        _wrapped(_edit(REVERSED + ["layer", "config", "bias"], False)),
        r"layer 0 \(Stateful\(Reversed\(LSTM\)\), input_size=3, hidden_size=4, .*\) calls for 2 "
        r"arrays of 112 values, but the file holds 4 arrays of 144 values for it"),
}
CASES.update(WRAPPED_CASES)


# --- safetensors files (names start with 'st_': written as .safetensors) -------------------------
def _st_raw(header_bytes, data=b""):
    """A safetensors file of exactly this header text and data."""
    return lambda path: path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes
                                         + data)


def _st_header(path):
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), data[8 + length:]


def _st_write(path, header, data):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _st(edit=None, edit_data=None, build=lambda path: _model().save(path)):
    """A good model's safetensors file, its header edited (edit(header), the
    __metadata__ included) or its data (edit_data(bytearray, header))."""
    def make(path):
        build(path)
        header, data = _st_header(path)
        data = bytearray(data)
        if edit is not None:
            edit(header)
        if edit_data is not None:
            edit_data(data, header)
        _st_write(path, header, bytes(data))
    return make


def _st_config(edit):
    """Edit the fastrnn description in the __metadata__."""
    def change(header):
        config = json.loads(header["__metadata__"]["fastrnn"])
        edit(config)
        header["__metadata__"]["fastrnn"] = json.dumps(config)
    return change


def _st_tensor(name, **changes):
    def change(header):
        header[name].update(changes)
    return change


def _st_nan(data, header):
    begin, end = header["2.weight"]["data_offsets"]
    data[begin:end] = np.full((end - begin) // 4, np.nan, "<f4").tobytes()


def _st_swap_offsets(header):
    """bias_hh_l0 moved onto bias_ih_l0's bytes (of the same size): they overlap."""
    header["0.bias_hh_l0"]["data_offsets"] = list(header["0.bias_ih_l0"]["data_offsets"])


def _st_duplicate(path):
    _model().save(path)
    header, data = _st_header(path)
    text = json.dumps(header)
    entry = json.dumps({"2.bias": header["2.bias"]})[1:-1]
    _st_raw(text[:-1].encode() + b", " + entry.encode() + b"}", data)(path)


def _st_many_tensors(path):
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
              for i in range(20000)}
    _st_write(path, header, b"")


def _st_bare(path):
    state = fastrnn.LSTM(3, 4, seed=0).state_dict()
    header, end = {}, 0
    for name, value in state.items():
        header[name] = {"dtype": "F32", "shape": list(value.shape),
                        "data_offsets": [end, end + value.nbytes]}
        end += value.nbytes
    _st_write(path, header, b"".join(value.tobytes() for value in state.values()))


def _st_layer_with_optimizer(path):
    fastrnn.Linear(2, 2, seed=0).save(path)
    header, data = _st_header(path)
    header["optimizer/0.weight.exp_avg"] = {"dtype": "F32", "shape": [2, 2],
                                            "data_offsets": [len(data), len(data) + 16]}
    _st_write(path, header, data + bytes(16))


def _st_trained_wrong_optimizer_shape(header):
    entry = header["optimizer/2.weight.exp_avg"]
    entry["shape"] = entry["shape"][::-1]


ST_CASES = {
    "st_good": (lambda path: _model().save(path), None),
    "st_good_layer": (lambda path: fastrnn.LSTM(3, 4, num_layers=2, bidirectional=True,
                                                seed=0).save(path), None),
    "st_good_trained": (lambda path: _trained(bidirectional=True).save(path), None),
    "st_empty": (lambda path: path.write_bytes(b""), r"the file is empty"),
    "st_too_short": (lambda path: path.write_bytes(b"\x02\0\0"),
                     r"it has 3 bytes, fewer than the 8 of a safetensors header's length"),
    "st_header_beyond_file": (lambda path: path.write_bytes(struct.pack("<Q", 2**40) + b"{}"),
                              r"its safetensors header declares 1,099,511,627,776 bytes, more "
                              r"than the 2 after its length"),
    "st_huge_header": (_st_raw(b"{}" + b" " * (9 << 20)),
                       r"its safetensors header takes 9,437,186 bytes, more than 8,388,608"),
    "st_header_not_json": (_st_raw(b"{nope}"),
                           r"its safetensors header is not valid JSON \(Expecting property"),
    "st_header_not_utf8": (_st_raw(b'{"\xff": 1}'), r"its safetensors header is not UTF-8 text"),
    "st_header_a_list": (_st_raw(b"[1, 2]"),
                         r"its safetensors header should be a JSON object, got list"),
    "st_deep_json": (_st_raw(b'{"a": ' + _deep_json(200000).encode() + b"}"),
                     r"its safetensors header \(JSON\) is nested too deeply"),
    "st_deep_shape": (_st(_st_tensor("2.bias", shape=[[[2]]])),
                      r"its safetensors header \(JSON\) is nested too deeply \(more than 3 "
                      r"levels\)"),
    "st_duplicate_tensor": (_st_duplicate, r"its safetensors header names '2.bias' twice"),
    "st_many_tensors": (_st_many_tensors, r"it has 20,000 tensors, more than 10,000"),
    "st_tensor_extra_key": (_st(_st_tensor("2.bias", evil=1)),
                            r"tensor '2.bias' should be an object of 'dtype', 'shape' and "
                            r"'data_offsets', got \['data_offsets', 'dtype', 'evil', 'shape'\]"),
    "st_dtype_unknown": (_st(_st_tensor("2.bias", dtype="F12")),
                         r"tensor '2.bias' has the unknown dtype 'F12' \(safetensors' are F64, "
                         r"F32, "),
    "st_dtype_integer": (_st(_st_tensor("2.bias", dtype="I32")),
                         r"tensor '2.bias' holds I32 data; weights must be F32 or F64"),
    "st_negative_shape": (_st(_st_tensor("2.bias", shape=[-2])),
                          r"tensor '2.bias' should have a shape of at most 64 integers in "
                          r"\[0, 2\*\*63\), got \[-2\]"),
    "st_shape_a_string": (_st(_st_tensor("2.bias", shape="2")),
                          r"tensor '2.bias' should have a shape of at most 64 integers in "
                          r"\[0, 2\*\*63\), got '2'"),
    "st_shape_lies": (_st(_st_tensor("2.bias", shape=[100000, 100000])),
                      r"tensor '2.bias' is \(100000, 100000\) of F32 \(40,000,000,000 bytes\), "
                      r"but spans 8 bytes"),
    "st_shape_huge": (_st(_st_tensor("2.bias", shape=[2**62, 2**62])),
                      r"tensor '2.bias' is \(4611686018427387904, 4611686018427387904\) of F32 "
                      r"\(about 10\^38 bytes\), but spans 8 bytes"),
    "st_offsets_outside": (_st(_st_tensor("2.bias", data_offsets=[0, 2**40])),
                           r"tensor '2.bias' spans bytes 0 to 1,099,511,627,776 of the data, "
                           r"which has [0-9,]+"),
    "st_offsets_reversed": (_st(_st_tensor("2.bias", data_offsets=[8, 0])),
                            r"tensor '2.bias' should have data_offsets \[begin, end\] with 0 <= "
                            r"begin <= end, got \[8, 0\]"),
    "st_offsets_overlap": (_st(_st_swap_offsets),
                           r"tensors '0.bias_(ih|hh)_l0' and '0.bias_(ih|hh)_l0' overlap "
                           r"\(bytes [0-9,]+ to [0-9,]+ of the data\)"),
    "st_trailing_bytes": (_st(edit_data=lambda data, header: data.extend(bytes(12))),
                          r"bytes [0-9,]+ to [0-9,]+ of its data belong to no tensor"),
    "st_nan_weights": (_st(edit_data=_st_nan),
                       r"layer 2 \(Linear\): Linear: weight has non-finite values"),
    "st_metadata_not_strings": (_st(lambda h: h["__metadata__"].update(
        fastrnn=json.loads(h["__metadata__"]["fastrnn"]))),
        r"its __metadata__ should map names to strings, got dict for 'fastrnn'"),
    "st_metadata_a_number": (_st(lambda h: h["__metadata__"].update(format=1)),
                             r"its __metadata__ should map names to strings, got int for "
                             r"'format'"),
    "st_metadata_a_list": (_st(lambda h: h.update(__metadata__=[])),
                           r"its __metadata__ should be an object of strings, got list"),
    "st_no_fastrnn_metadata": (_st_bare,
                               r"its __metadata__ holds no fastrnn description \(key 'fastrnn'\)"),
    "st_config_not_json": (_st(lambda h: h["__metadata__"].update(fastrnn="{nope")),
                           r"its configuration is not valid JSON \(Expecting property name"),
    "st_config_huge": (_st(lambda h: h["__metadata__"].update(
        fastrnn=h["__metadata__"]["fastrnn"][:-1] + " " * (2 << 20) + "}")),
        # (2 MiB of padding plus the model's own configuration, ~1-2 KB)
        r"its configuration has 2,09[78],[0-9]+ characters, more than 1,048,576"),
    "st_config_deep": (_st(lambda h: h["__metadata__"].update(fastrnn=_deep_json(100000))),
                       r"its configuration \(JSON\) is nested too deeply"),
    "st_huge_hidden_size": (_st(_st_config(lambda c: c["layers"][0]["config"].update(
        hidden_size=10000))),
        r"layer 0 \(LSTM, input_size=3, hidden_size=10000, .*\) calls for 4 arrays of "
        r"400,200,000 values, but the file holds 4 arrays of 144 values for it"),
    "st_renamed_weight": (_st(lambda h: h.update({"0.bias_hh_l9": h.pop("0.bias_hh_l0")})),
                          r"layer 0 \(LSTM\): missing weights \['bias_hh_l0'\], unexpected "
                          r"weights \['bias_hh_l9'\]"),
    "st_optimizer_in_a_layer_file": (_st_layer_with_optimizer,
                                     r"it holds optimizer arrays \(\['0.weight.exp_avg'\]\) but "
                                     r"no optimizer configuration"),
    "st_optimizer_wrong_shape": (_st(_st_trained_wrong_optimizer_shape,
                                     build=lambda path: _trained().save(path)),
                                 r"optimizer array '2.weight.exp_avg' is \(4, 2\) of float32; "
                                 r"its parameter is \(2, 4\) of float32"),
    "st_good_wrapped_trained": (lambda path: _wrapped_model(trained=True).save(path), None),
    "st_wrapper_keep_order_a_number": (
        _st(_st_config(lambda c: c["layers"][0]["layer"]["config"].update(keep_order=1)),
            build=lambda path: _wrapped_model().save(path)),
        r"layer 0 \(Reversed\) has a bad configuration: Reversed: keep_order must be a bool, "
        r"got int"),
    "st_wrapper_of_a_cell": (
        _st(_st_config(lambda c: c["layers"][0]["layer"].update(layer={
            "class": "LSTMCell", "config": {"input_size": 3, "hidden_size": 4}})),
            build=lambda path: _wrapped_model().save(path)),
        r"layer 0 names an unknown class 'LSTMCell'"),
    "st_random_bytes": (lambda path: path.write_bytes(
        np.random.default_rng(2).integers(0, 256, 4000, dtype=np.uint8).tobytes()),
        r"its safetensors header declares [0-9,]+ bytes, more than the 3,992 after its length"),
}
CASES.update(ST_CASES)

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    import fastrnn

    def mapped():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024

    baseline = mapped()
    bound = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (baseline + bound, resource.RLIM_INFINITY))
    results = {}
    for name, path in json.loads(sys.argv[2]).items():
        start = time.perf_counter()
        try:
            fastrnn.load(path)
            outcome = ("loaded", "")
        except Exception as exc:
            outcome = (type(exc).__name__, str(exc)[:3000])
        results[name] = outcome + (time.perf_counter() - start,)
    print("RESULTS " + json.dumps({"baseline": baseline, "results": results}))
""")


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hostile")
    paths = {}
    for name, (build, _) in CASES.items():
        path = directory / (name + (".safetensors" if name.startswith("st_") else ".npz"))
        build(path)
        paths[name] = str(path)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(MEMORY_BOUND), json.dumps(paths)],
                          capture_output=True, text=True, timeout=600, cwd=directory)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULTS "):])["results"]


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_file_gives_a_quick_value_error(case, outcomes):
    kind, message, seconds = outcomes[case]
    expected = CASES[case][1]
    if expected is None:
        assert kind == "loaded", message
    else:
        assert kind == "ValueError", f"{kind}: {message[:500]}"
        assert message.startswith("fastrnn.load: ") and "is not a valid fastrnn model file: " \
            in message, message[:500]
        assert re.search(expected, message), message[:500]
        assert len(message) < 2000, message[:500]
    assert seconds < SECONDS_PER_LOAD, f"{case} took {seconds:.2f} s"


def test_the_corpus_files_fail_only_where_intended(tmp_path):
    """The builders' untouched parts are sound: the good model's members load."""
    _zip(tmp_path / "m.npz", _good_members())
    loaded = fastrnn.load(tmp_path / "m.npz")
    expected = _model()
    assert all(np.array_equal(loaded.state_dict()[k], v) for k, v in expected.state_dict().items())


def test_a_safetensors_shape_of_huge_sizes_is_refused_at_once(tmp_path):
    """A shape of many sizes of thousands of digits each (JSON allows them)
    was multiplied before any bound: an 8 MB header took 198 s to refuse,
    time quadratic in the file's size (and one with a size 0 among them
    passed, as 0 bytes). Each size is bounded first."""
    path = tmp_path / "huge.safetensors"
    header = {"__metadata__": {"format": "pt"},
              "w": {"dtype": "F32", "shape": [10 ** 4000] * 100 + [0], "data_offsets": [0, 0]}}
    _st_write(path, header, b"")
    for read in (fastrnn.load, fastrnn.load_state_dict_file):
        with pytest.raises(ValueError, match=r"tensor 'w' should have a shape of at most 64 "
                                             r"integers in \[0, 2\*\*63\)"):
            read(path)
    header["w"]["shape"] = [1] * 65
    _st_write(path, header, b"")
    with pytest.raises(ValueError, match=r"a shape of at most 64 integers"):
        fastrnn.load_state_dict_file(path)
