"""Model files in the safetensors format: the round trip through fastrnn,
the choice of format by extension, and interchange with PyTorch and the
`safetensors` package both ways (skipped when they are missing). The hostile
safetensors files are in test_hostile_files.py."""
import json
import struct
import zipfile

import numpy as np
import pytest

import fastrnn
from fastrnn.model import load_state_dict_file


def _header(path):
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), 8 + length


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype
        np.testing.assert_array_equal(sa[key], sb[key])


def _trained(seed=0):
    model = fastrnn.Sequential([
        fastrnn.LSTM(3, 5, batch_first=True, bidirectional=True, seed=seed),
        fastrnn.Dropout(0.2, seed=seed + 1), fastrnn.LastStep(bidirectional=True),
        fastrnn.Linear(10, 2, seed=seed + 2)], seed=seed + 3)
    model.compile("mse", fastrnn.optim.Adam(lr=0.01), metrics=["mae"])
    fastrnn.optim.StepLR(model.optimizer, step_size=2)
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((12, 6, 3)), rng.standard_normal((12, 2))
    model.fit(x, y, batch_size=4, verbose=0, callbacks=model.optimizer.schedules)
    return model, x, y


LAYERS = {
    "lstm_2_layers_bidirectional": lambda: fastrnn.LSTM(3, 7, num_layers=2, bidirectional=True,
                                                        seed=0),
    "gru_float64": lambda: fastrnn.GRU(1, 3, dtype=np.float64, seed=1),
    "gru_reset_before": lambda: fastrnn.GRU(3, 3, reset_after=False, seed=2),
    "rnn_relu_no_bias": lambda: fastrnn.RNN(4, 3, nonlinearity="relu", bias=False, seed=3),
    "lstm_cell": lambda: fastrnn.LSTMCell(3, 7, seed=4),
    "linear": lambda: fastrnn.Linear(3, 1, seed=5),
    "dropout": lambda: fastrnn.Dropout(0.5, seed=6),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_a_layer_round_trips_under_its_state_dict_names(name, tmp_path):
    layer = LAYERS[name]()
    path = tmp_path / "layer.safetensors"
    fastrnn.save(layer, path)
    header, _ = _header(path)
    metadata = header.pop("__metadata__")
    # exactly the module's names (and a note where PyTorch's would compute otherwise)
    marked = name == "gru_reset_before"
    assert list(header) == list(layer.state_dict()) + ["pytorch_cannot_compute"] * marked
    header.pop("pytorch_cannot_compute", None)
    assert metadata["format"] == "pt" and json.loads(metadata["fastrnn"])["kind"] == "layer"
    loaded = fastrnn.load(path)
    assert type(loaded) is type(layer) and repr(loaded) == repr(layer)
    _same_weights(loaded, layer)
    for key, value in loaded.state_dict().items():             # the file's own bytes
        assert header[key]["dtype"] == {"float32": "F32", "float64": "F64"}[value.dtype.name]


def test_a_trained_model_goes_on_as_from_the_npz_file(tmp_path):
    model, x, y = _trained()
    model.save(tmp_path / "m.safetensors")
    model.save(tmp_path / "m.npz")
    header, _ = _header(tmp_path / "m.safetensors")
    names = [key for key in header if key != "__metadata__"]
    assert [key for key in names if not key.startswith("optimizer/")] == list(model.state_dict())
    assert "optimizer/3.weight.exp_avg" in names
    a, b = fastrnn.load(tmp_path / "m.safetensors"), fastrnn.load(tmp_path / "m.npz")
    _same_weights(a, b)
    for m in (a, b):
        m.fit(x, y, batch_size=4, epochs=3, initial_epoch=1, verbose=0,
              callbacks=m.optimizer.schedules)
    _same_weights(a, b)                       # moments, steps, schedule, dropout and shuffling
    model.fit(x, y, batch_size=4, epochs=3, initial_epoch=1, verbose=0,
              callbacks=model.optimizer.schedules)
    _same_weights(a, model)


def test_without_the_optimizer_only_the_weights_are_tensors(tmp_path):
    model, _, _ = _trained()
    model.save(tmp_path / "m.safetensors", include_optimizer=False)
    header, _ = _header(tmp_path / "m.safetensors")
    assert [key for key in header if key != "__metadata__"] == list(model.state_dict())
    assert fastrnn.load(tmp_path / "m.safetensors").optimizer is None


def test_the_extension_chooses_the_format_and_the_content_the_reader(tmp_path):
    layer = fastrnn.GRU(2, 3, seed=0)
    for name in ("a.SafeTensors", "b.safetensors"):
        fastrnn.save(layer, str(tmp_path / name).encode())      # bytes paths too
        assert not zipfile.is_zipfile(tmp_path / name)
    for name in ("c.npz", "d.bin", "e", "f.safetensors.npz"):
        fastrnn.save(layer, tmp_path / name)
        assert zipfile.is_zipfile(tmp_path / name)           # written under the name given
    (tmp_path / "b.safetensors").rename(tmp_path / "renamed.bin")
    (tmp_path / "c.npz").rename(tmp_path / "renamed.safetensors")
    _same_weights(fastrnn.load(tmp_path / "renamed.bin"), layer)
    _same_weights(fastrnn.load(tmp_path / "renamed.safetensors"), layer)
    _same_weights(fastrnn.load(str(tmp_path / "a.SafeTensors").encode()), layer)


def test_the_parameters_are_the_modules_own_arrays(tmp_path):
    """Loading copies out of the mapped file: rewriting the file afterwards
    changes nothing, and no parameter views the mapping."""
    layer = fastrnn.LSTM(4, 6, num_layers=2, seed=0)
    path = tmp_path / "l.safetensors"
    layer.save(path)
    loaded = fastrnn.load(path)
    _, start = _header(path)
    data = bytearray(path.read_bytes())
    data[start:] = bytes(len(data) - start)
    path.write_bytes(bytes(data))
    _same_weights(loaded, layer)
    for value in loaded._params.storages:
        # down the chain of views to the memory (a storage is sealed: an array
        # over a read-only memoryview of its array, fastrnn._module.sealed)
        owner = value
        while owner.base is not None:
            owner = owner.base.obj if isinstance(owner.base, memoryview) else owner.base
        assert isinstance(owner, np.ndarray) and owner.flags.owndata


def test_sequential_save_and_load_refuse_as_before(tmp_path):
    fastrnn.save(fastrnn.LSTM(2, 3, seed=0), tmp_path / "l.safetensors")
    with pytest.raises(ValueError, match=r"Sequential.load: .* holds a single LSTM, not a "
                                         r"Sequential; use fastrnn.load"):
        fastrnn.Sequential.load(tmp_path / "l.safetensors")
    model = fastrnn.Sequential([fastrnn.Linear(2, 2, seed=0)])
    model.save(tmp_path / "s.safetensors")
    assert isinstance(fastrnn.Sequential.load(tmp_path / "s.safetensors"), fastrnn.Sequential)


def _bare(path, tensors, metadata=None):
    """A safetensors file of `tensors` (name -> little-endian array), written here."""
    header, end, blobs = {}, 0, []
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, value in tensors.items():
        code = {"float32": "F32", "float64": "F64", "float16": "F16", "int64": "I64",
                "uint16": "BF16"}[value.dtype.name]
        header[name] = {"dtype": code, "shape": list(value.shape),
                        "data_offsets": [end, end + value.nbytes]}
        end += value.nbytes
        blobs.append(value.tobytes())
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def test_load_state_dict_file_reads_a_bare_state_dict(tmp_path):
    layer = fastrnn.LSTM(3, 4, seed=0)
    state = layer.state_dict()
    _bare(tmp_path / "s.safetensors", {k: v.astype(np.float64) for k, v in state.items()})
    got = load_state_dict_file(tmp_path / "s.safetensors")
    assert list(got) == list(state)
    # arrays of their own: the views of the mapped file they were changed with
    # a file copied over it, and a shorter one killed the process when read
    import shutil
    _bare(tmp_path / "short.safetensors", {"w": np.zeros(1)})
    shutil.copyfile(tmp_path / "short.safetensors", tmp_path / "s.safetensors")
    for key, value in got.items():
        np.testing.assert_array_equal(value, state[key])
    other = fastrnn.LSTM(3, 4, seed=1)
    other.load_state_dict(got)
    _same_weights(other, layer)
    with pytest.raises(ValueError, match=r"fastrnn.load: .* its __metadata__ holds no fastrnn "
                                         r"description \(key 'fastrnn'\): a bare state dict .* "
                                         r"layer.load_state_dict\(fastrnn.load_state_dict_file"):
        fastrnn.load(tmp_path / "s.safetensors")


def test_load_state_dict_file_of_half_precision_and_of_a_model_file(tmp_path):
    values = np.array([1.5, -2.25, 3e38], np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)
    _bare(tmp_path / "h.safetensors", {"a": values[:2].astype(np.float16), "b": bf16,
                                       "c": np.arange(3, dtype=np.int64), "empty": np.zeros(0)})
    got = load_state_dict_file(tmp_path / "h.safetensors")
    assert got["a"].dtype == np.float16 and got["b"].dtype == np.float32
    np.testing.assert_array_equal(got["b"], (bf16.astype(np.uint32) << 16).view(np.float32))
    np.testing.assert_array_equal(got["b"][:2], values[:2])
    np.testing.assert_array_equal(got["c"], [0, 1, 2])
    assert got["empty"].shape == (0,)
    model, _, _ = _trained()
    model.save(tmp_path / "m.safetensors")                  # with the optimizer's tensors
    state = load_state_dict_file(tmp_path / "m.safetensors")
    assert list(state) == list(model.state_dict())
    fresh = _trained(seed=5)[0]
    fresh.load_state_dict(state)
    _same_weights(fresh, model)


def test_load_state_dict_file_refuses_by_name(tmp_path):
    path = tmp_path / "f8.safetensors"
    text = json.dumps({"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\0\0")
    with pytest.raises(ValueError, match=r"fastrnn.load_state_dict_file: .* is not a valid "
                                         r"safetensors file: tensor 'w' holds F8_E4M3 data, "
                                         r"which numpy does not represent"):
        load_state_dict_file(path)
    path.write_bytes(struct.pack("<Q", 99) + b"{}")
    with pytest.raises(ValueError, match=r"its safetensors header declares 99 bytes, more "
                                         r"than the 2 after its length"):
        load_state_dict_file(path)
    with pytest.raises(ValueError, match=r"it is not a regular file"):
        load_state_dict_file(tmp_path)


# --- PyTorch and the safetensors package --------------------------------------------------------
def _torch():
    torch = pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    return torch


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_a_layer_file_loads_strictly_into_pytorch(kind, tmp_path):
    torch = _torch()
    from safetensors.torch import load_file
    layer = getattr(fastrnn, kind)(3, 5, num_layers=2, bidirectional=True, batch_first=True,
                                   seed=0)
    layer.save(tmp_path / "l.safetensors")
    module = getattr(torch.nn, kind)(3, 5, num_layers=2, bidirectional=True, batch_first=True)
    module.load_state_dict(load_file(tmp_path / "l.safetensors"), strict=True)
    x = np.random.default_rng(0).standard_normal((2, 4, 3)).astype(np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(layer(x)[0], expected, rtol=1e-5, atol=1e-6)


def test_a_sequential_file_loads_strictly_into_nn_sequential(tmp_path):
    torch = _torch()
    from safetensors.torch import load_file
    model, x, _ = _trained()
    model.save(tmp_path / "m.safetensors", include_optimizer=False)
    module = torch.nn.Sequential(torch.nn.LSTM(3, 5, batch_first=True, bidirectional=True),
                                 torch.nn.Dropout(0.2), torch.nn.Identity(),
                                 torch.nn.Linear(10, 2))
    module.load_state_dict(load_file(tmp_path / "m.safetensors"), strict=True)
    model.save(tmp_path / "opt.safetensors")                  # with the optimizer's tensors
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*optimizer/"):
        module.load_state_dict(load_file(tmp_path / "opt.safetensors"), strict=True)
    state = {k: v for k, v in load_file(tmp_path / "opt.safetensors").items()
             if not k.startswith("optimizer/")}
    module.load_state_dict(state, strict=True)
    np.testing.assert_array_equal(module[3].weight.detach().numpy(), model[3].weight)


NOT_PYTORCH = {
    "reset_before": (lambda: fastrnn.GRU(3, 5, reset_after=False, seed=0),
                     "GRU has reset_after=False; PyTorch has only the reset-after GRU"),
    "zoneout": (lambda: fastrnn.LSTM(3, 5, zoneout=0.1, seed=0),
                "LSTM has zoneout=0.1; PyTorch has no such option"),
    "coupled_gates": (lambda: fastrnn.LSTMCell(3, 5, input_forget=True, seed=0),
                      "LSTMCell has input_forget=True; PyTorch has no such option"),
    "weight_dropout": (lambda: fastrnn.RNN(3, 5, weight_dropout=0.2, seed=0),
                       "RNN has weight_dropout=0.2; PyTorch has no such option"),
}


@pytest.mark.parametrize("case", list(NOT_PYTORCH))
def test_a_file_of_a_layer_pytorch_cannot_compute_is_refused_there(case, tmp_path):
    """The weights keep PyTorch's names, but a note beside them (its reason)
    makes PyTorch's strict load_state_dict refuse the file: it took the
    weights of a GRU with reset_after=False and computed the reset-after
    GRU. fastrnn reads the file as before."""
    torch = _torch()
    from safetensors.torch import load_file
    make, reason = NOT_PYTORCH[case]
    layer = make()
    name = type(layer).__name__
    module = getattr(torch.nn, name)(3, 5)
    layer.save(tmp_path / "l.safetensors")
    tensors = load_file(tmp_path / "l.safetensors")
    assert bytes(tensors["pytorch_cannot_compute"].numpy()).decode() == reason
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\).*"pytorch_cannot_compute"'):
        module.load_state_dict(tensors, strict=True)
    loaded = fastrnn.load(tmp_path / "l.safetensors")
    assert repr(loaded) == repr(layer)
    _same_weights(loaded, layer)
    state = load_state_dict_file(tmp_path / "l.safetensors")
    assert sorted(state) == sorted(layer.state_dict())
    if name.endswith("Cell"):
        return                                   # (a Sequential takes sequence layers)
    # a wrapped layer is marked too
    model = fastrnn.Sequential([fastrnn.Stateful(make()) if case == "zoneout" else make()])
    model.save(tmp_path / "m.safetensors")
    tensors = load_file(tmp_path / "m.safetensors")
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\).*"0.pytorch_cannot_compute"'):
        torch.nn.Sequential(module).load_state_dict(tensors, strict=True)
    _same_weights(fastrnn.load(tmp_path / "m.safetensors"), model)
    assert sorted(load_state_dict_file(tmp_path / "m.safetensors")) == sorted(model.state_dict())


def test_a_reversed_layers_file_is_refused_by_pytorch():
    """A Reversed GRU's weights loaded strictly into PyTorch's GRU, which
    reads the sequence from its start: marked as a layer PyTorch cannot
    compute."""
    torch = _torch()
    from safetensors.torch import load_file
    import tempfile, os
    model = fastrnn.Sequential([fastrnn.Reversed(fastrnn.GRU(3, 5, seed=0))])
    with tempfile.TemporaryDirectory() as where:
        path = os.path.join(where, "r.safetensors")
        model.save(path)
        tensors = load_file(path)
        assert bytes(tensors["0.pytorch_cannot_compute"].numpy()).decode().startswith(
            "GRU runs in a Reversed")
        with pytest.raises(RuntimeError, match=r"Unexpected key"):
            torch.nn.Sequential(torch.nn.GRU(3, 5)).load_state_dict(tensors, strict=True)
        _same_weights(fastrnn.load(path), model)


def test_a_pytorch_file_loads_here(tmp_path):
    torch = _torch()
    from safetensors.torch import save_file
    torch.manual_seed(0)
    module = torch.nn.LSTM(3, 5, num_layers=2, bidirectional=True)
    save_file(module.state_dict(), tmp_path / "torch.safetensors")
    layer = fastrnn.LSTM(3, 5, num_layers=2, bidirectional=True)
    layer.load_state_dict(load_state_dict_file(tmp_path / "torch.safetensors"))
    x = np.random.default_rng(1).standard_normal((4, 2, 3)).astype(np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(layer(x)[0], expected, rtol=1e-5, atol=1e-6)
    save_file({k: v.to(torch.bfloat16) for k, v in module.state_dict().items()},
              tmp_path / "bf16.safetensors")
    layer.load_state_dict(load_state_dict_file(tmp_path / "bf16.safetensors"))
    np.testing.assert_array_equal(layer.weight_hh_l1,
                                  module.weight_hh_l1.detach().to(torch.bfloat16).float())


def test_the_safetensors_package_reads_our_files_and_we_read_its(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file
    model, _, _ = _trained()
    model.save(tmp_path / "m.safetensors")
    ours = load_file(tmp_path / "m.safetensors")
    with safe_open(tmp_path / "m.safetensors", "np") as f:
        assert json.loads(f.metadata()["fastrnn"])["format"] == "fastrnn/2"
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(ours[key], value)
    # the package's layout (sorted by dtype, then name) with our metadata still loads
    with safe_open(tmp_path / "m.safetensors", "np") as f:
        metadata = f.metadata()
    save_file(ours, tmp_path / "theirs.safetensors", metadata=metadata)
    _same_weights(fastrnn.load(tmp_path / "theirs.safetensors"), model)


def test_memory_running_out_while_mapping_a_good_file_is_a_memory_error(tmp_path, monkeypatch):
    # mmap's ENOMEM (too little address space) was reported as "not a valid
    # ... file", which a caller catching MemoryError would not catch
    import errno
    from fastrnn import _saving
    path = tmp_path / "lstm.safetensors"
    fastrnn.LSTM(3, 4, seed=0).save(path)

    def short_of_memory(f, size):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(_saving, "_mapped", short_of_memory)
    with pytest.raises(MemoryError, match=r"fastrnn\.load: not enough memory to read .*lstm"
                                          r"\.safetensors.*Cannot allocate memory"):
        fastrnn.load(path)
    with pytest.raises(MemoryError, match=r"fastrnn\.load_state_dict_file: not enough memory "
                                          r"to read .*Cannot allocate memory"):
        load_state_dict_file(path)
    monkeypatch.undo()
    assert isinstance(fastrnn.load(path), fastrnn.LSTM)
