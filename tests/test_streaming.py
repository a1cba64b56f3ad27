"""Streaming: feeding a sequence in pieces gives the outputs of one call."""
import pickle

import numpy as np
import pytest

import fastrnn
from test_forward import KINDS, make_layer


def split_points(T, rng):
    cuts = sorted(rng.choice(np.arange(1, T), size=3, replace=False))
    return [0, *cuts, T]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_layer_chunks_equal_one_call(kind, batch_first):
    rng = np.random.default_rng(0)
    layer = make_layer(kind, 3, 5, num_layers=2, batch_first=batch_first, dtype="float64",
                       seed=1)
    T, B = 17, 3
    x = rng.standard_normal((B, T, 3) if batch_first else (T, B, 3))
    whole, whole_state = layer(x)
    stream = fastrnn.Stream(layer)
    pieces = []
    for t0, t1 in zip(*(lambda p: (p[:-1], p[1:]))(split_points(T, rng))):
        pieces.append(stream(x[:, t0:t1] if batch_first else x[t0:t1]))
    got = np.concatenate(pieces, axis=1 if batch_first else 0)
    np.testing.assert_allclose(got, whole, rtol=0, atol=1e-13)
    for a, b in zip(np.atleast_1d(stream.state[0]), np.atleast_1d(whole_state)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-13)


@pytest.mark.parametrize("kind", KINDS)
def test_frames_equal_one_call_and_state_round_trips(kind):
    rng = np.random.default_rng(1)
    layer = make_layer(kind, 4, 6, dtype="float64", seed=2)
    x = rng.standard_normal((12, 4))                          # one unbatched stream
    whole, _ = layer(x)
    stream = fastrnn.Stream(layer)
    outs = [stream.step(frame) for frame in x[:5]]
    checkpoint = stream.state
    outs += [stream.step(frame) for frame in x[5:]]
    np.testing.assert_allclose(np.array(outs), whole, rtol=0, atol=1e-13)
    stream.state = checkpoint                                  # resume from step 5
    again = [stream.step(frame) for frame in x[5:]]
    np.testing.assert_allclose(np.array(again), whole[5:], rtol=0, atol=1e-13)
    copy = pickle.loads(pickle.dumps(stream))                  # model and state travel
    stream.state = checkpoint
    copy.state = checkpoint
    np.testing.assert_array_equal(copy.step(x[5]), stream.step(x[5]))
    stream.reset()
    np.testing.assert_allclose(stream.step(x[0]), whole[0], rtol=0, atol=1e-13)


def test_sequential_model_streams():
    rng = np.random.default_rng(2)
    model = fastrnn.Sequential([fastrnn.GRU(2, 8, batch_first=True, seed=0),
                                fastrnn.Dropout(0.5, seed=1),
                                fastrnn.LSTM(8, 6, seed=2),      # time-major inside: adapted
                                fastrnn.Linear(6, 1, seed=3)])
    x = rng.standard_normal((3, 20, 2))
    whole = model(x)
    stream = fastrnn.Stream(model)
    got = np.concatenate([stream(x[:, :7]), stream(x[:, 7:8]), stream(x[:, 8:])], axis=1)
    np.testing.assert_allclose(got, whole, rtol=0, atol=1e-5)
    stream.reset()
    frames = np.stack([stream.step(x[:, t]) for t in range(20)], axis=1)
    np.testing.assert_allclose(frames, whole, rtol=0, atol=1e-5)


def test_a_stateful_layer_streams_from_the_streams_state():
    """A Stateful streams as the layer it wraps, from the Stream's own state:
    the Stateful's carried state is neither read nor changed, and its fixed
    batch size does not apply; setting the stream's state to the Stateful's
    goes on where the Stateful stopped."""
    rng = np.random.default_rng(3)
    lstm = fastrnn.LSTM(2, 5, batch_first=True, dtype="float64", seed=0)
    head = fastrnn.Linear(5, 1, dtype="float64", seed=1)
    stateful = fastrnn.Stateful(lstm, batch_size=3)
    x = rng.standard_normal((3, 12, 2))
    stateful(x[:, :4])
    carried = stateful.state
    model = fastrnn.Sequential([stateful, head])
    stream = fastrnn.Stream(model)
    got = np.concatenate([stream(x[:, :7]), stream(x[:, 7:])], axis=1)
    np.testing.assert_allclose(got, fastrnn.Sequential([lstm, head])(x), rtol=0, atol=1e-13)
    for a, b in zip(stateful.state, carried):
        np.testing.assert_array_equal(a, b)
    stream.reset()
    stream.state = [stateful.state]
    np.testing.assert_allclose(stream(x[:, 4:]), model(x[:, 4:]), rtol=0, atol=1e-13)
    alone = fastrnn.Stream(stateful)                 # one unbatched stream
    np.testing.assert_allclose(alone.step(x[0, 0]), lstm(x[0, :1])[0][0], rtol=0, atol=1e-13)
    assert repr(alone).startswith("Stream(Stateful(LSTM(2, 5")


def test_a_reversed_layer_is_refused_by_name():
    """A Reversed layer reads the sequence from its end: it cannot stream,
    alone, in a Stateful or in a Sequential."""
    rev = fastrnn.Reversed(fastrnn.GRU(2, 3, batch_first=True, seed=0))
    for model in (rev, fastrnn.Stateful(rev),
                  fastrnn.Sequential([rev, fastrnn.Linear(3, 1, seed=1)])):
        with pytest.raises(ValueError, match=r"Stream: (Stateful\()?Reversed\(GRU\(2, 3, "
                                             r"batch_first=True\)\)\)? runs its layer over "
                                             r"the time-reversed sequence, .* it needs the whole "
                                             r"sequence, so it cannot stream"):
            fastrnn.Stream(model)


def _masked_ids():
    """Ids with left padding (row 0), holes (row 1, also at its start) and
    right padding (row 2): id 0 is masked."""
    ids = np.random.default_rng(0).integers(1, 10, (3, 9))
    ids[0, :3] = 0
    ids[1, 0] = ids[1, 4:6] = 0
    ids[2, 7:] = 0
    return ids


@pytest.mark.parametrize("recurrent", [
    lambda: fastrnn.GRU(4, 6, batch_first=True, seed=1),
    lambda: fastrnn.LSTM(4, 6, num_layers=2, seed=1),          # time-major inside
    lambda: fastrnn.Stateful(fastrnn.RNN(4, 6, batch_first=True, seed=1))])
@pytest.mark.parametrize("zero_output", [False, True])
def test_masks_stream_as_one_call_on_the_whole_sequence(recurrent, zero_output):
    """A Stream applies a model's masks (Embedding(mask_zero=True)) as a
    call on the whole sequence does: a masked step carries the state and
    repeats the last read step's output, from an earlier chunk too (zeros
    before the first; ZeroMasked zeroes them), in chunks of any sizes, frame
    by frame and one stream at a time."""
    ids = _masked_ids()
    layers = [fastrnn.Embedding(10, 4, mask_zero=True, seed=0), recurrent()]
    layers += [fastrnn.ZeroMasked()] if zero_output else []
    model = fastrnn.Sequential(layers + [fastrnn.Linear(6, 2, seed=2)])
    whole = model(ids)
    # float32: Linear's products on other shapes round apart by an ulp or two
    for cuts in ([2, 1, 4, 2], [1] * 9, [4, 5]):
        stream, outs, t = fastrnn.Stream(model), [], 0
        for size in cuts:
            outs.append(stream(ids[:, t:t + size]))
            t += size
        np.testing.assert_allclose(np.concatenate(outs, axis=1), whole, rtol=0, atol=1e-6)
    stream = fastrnn.Stream(model)
    frames = np.stack([stream.step(ids[:, t]) for t in range(9)], axis=1)
    np.testing.assert_allclose(frames, whole, rtol=0, atol=1e-6)
    stream = fastrnn.Stream(model)
    one = np.stack([stream.step(ids[1, t]) for t in range(9)])
    np.testing.assert_allclose(one, whole[1], rtol=0, atol=1e-6)
    # the repeated outputs are really in play: row 1's holes repeat step 3 (or are zero)
    zeroed = model[-1](np.zeros((1, 6), np.float32))[0]   # the head on a zero output
    for t in (4, 5):
        np.testing.assert_allclose(whole[1, t], zeroed if zero_output else whole[1, 3],
                                   rtol=0, atol=1e-6)


def test_masking_of_float_features_streams():
    x = np.random.default_rng(1).standard_normal((2, 7, 3)).astype(np.float32)
    x[0, 2:4] = 0.0
    x[1, :2] = 0.0
    model = fastrnn.Sequential([fastrnn.Masking(0.0), fastrnn.LSTM(3, 5, batch_first=True,
                                                                   seed=3)])
    whole = model(x)
    stream = fastrnn.Stream(model)
    chunks = np.concatenate([stream(x[:, :3]), stream(x[:, 3:])], axis=1)
    np.testing.assert_allclose(chunks, whole, rtol=0, atol=1e-6)
    stream.reset()
    np.testing.assert_allclose(stream(x), whole, rtol=0, atol=1e-6)


def test_an_embedding_streams_ids_and_refuses_other_shapes():
    model = fastrnn.Sequential([fastrnn.Embedding(5, 2), fastrnn.GRU(2, 3, batch_first=True)])
    stream = fastrnn.Stream(model)
    assert stream(np.array([[1, 2, 3]])).shape == (1, 3, 3)
    assert stream.step(4).shape == (3,)
    with pytest.raises(ValueError, match=r"Stream: expected a chunk of shape \(B, T\) or "
                                         r"\(T,\) ids, got \(1, 3, 2\)"):
        stream(np.ones((1, 3, 2)))


def test_bad_uses_are_refused_and_the_stream_stays_usable():
    lstm = fastrnn.LSTM(3, 4, seed=0)
    with pytest.raises(ValueError, match="bidirectional"):
        fastrnn.Stream(fastrnn.GRU(3, 4, bidirectional=True))
    with pytest.raises(TypeError, match="Stream: expected an RNN, GRU, LSTM, Stateful or "
                                        "Sequential, got Linear"):
        fastrnn.Stream(fastrnn.Linear(3, 4))
    with pytest.raises(ValueError, match="LastStep before a recurrent layer"):
        fastrnn.Stream(fastrnn.Sequential([fastrnn.GRU(3, 4, batch_first=True),
                                           fastrnn.LastStep(), fastrnn.GRU(4, 4)]))
    stream = fastrnn.Stream(lstm)
    out = stream.step(np.ones(3, np.float32))
    good = stream.state
    with pytest.raises(TypeError, match="state must be a list of 1 entry"):
        stream.state = good[0]
    stream.state = [(np.ones((1, 5)), np.ones((1, 5)))]        # wrong hidden size
    with pytest.raises(ValueError, match=r"LSTM: expected h_0 of shape \(1, 4\)"):
        stream.step(np.ones(3, np.float32))
    stream.state = good                                        # still usable
    np.testing.assert_array_equal(stream.state[0][0], good[0][0])
    with pytest.raises(ValueError, match=r"expected a frame of shape \(3,\) or \(B, 3\)"):
        stream.step(np.ones((1, 1, 3)))
    # a frame of the wrong width: named as given, not as the (B, 1, D) chunk made of it
    with pytest.raises(ValueError, match=r"Stream: expected a frame of shape \(3,\) or "
                                         r"\(B, 3\), got \(2, 5\)"):
        stream.step(np.ones((2, 5)))
    assert out.shape == (4,)
    # a Sequential's stream too [failed before: the (3, 1, 0) chunk was named]
    model_stream = fastrnn.Stream(fastrnn.Sequential([fastrnn.LSTM(3, 4, batch_first=True)]))
    for frame in (np.zeros((3, 0)), np.ones((2, 5))):
        with pytest.raises(ValueError, match=r"Stream: expected a frame of shape \(3,\) or "
                                             rf"\(B, 3\), got \({frame.shape[0]}, "
                                             rf"{frame.shape[1]}\)"):
            model_stream.step(frame)


def test_an_lstm_state_with_a_part_left_out_streams_from_zeros():
    rng = np.random.default_rng(4)
    lstm = fastrnn.LSTM(3, 4, seed=0)
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    h = rng.standard_normal((1, 2, 4)).astype(np.float32)
    want, _ = lstm(x, (h, np.zeros_like(h)))
    stream = fastrnn.Stream(lstm)
    stream.state = [(h, None)]
    assert stream.state[0][1] is None
    np.testing.assert_array_equal(stream(x), want)
    stateful = fastrnn.Stateful(fastrnn.LSTM(3, 4, seed=0))
    stateful.reset_state((h, None))
    assert stateful.state[1] is None
    stream.state = [stateful.state]                 # the Stream docstring's hand-over
    np.testing.assert_array_equal(stateful(x)[0], want)
    np.testing.assert_array_equal(stream(x), want)


@pytest.mark.parametrize("kind,quantized", [(kind, quantized) for kind in ("GRU", "RNN", "LSTM")
                                            for quantized in (False, True)]
                         + [("MyLSTM", False)])
def test_a_stateful_state_given_as_nested_lists_is_its_array(kind, quantized):
    """A GRU's or RNN's state is one array: reset_state(h.tolist()) is that
    array (it became a tuple of per-layer arrays, and the next call failed
    on "a tuple" the user never passed); an LSTM's list (a subclass's, a
    quantized one's) is its (h, c)."""
    class MyLSTM(fastrnn.LSTM):
        pass

    def make():
        layer = (MyLSTM if kind == "MyLSTM" else getattr(fastrnn, kind))(3, 4, seed=0)
        return fastrnn.quantize(layer) if quantized else layer

    rng = np.random.default_rng(5)
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    h = rng.standard_normal((1, 2, 4)).astype(np.float32)
    pair = kind.endswith("LSTM")
    want = make()(x, (h, h * 0.5) if pair else h)[0]
    stateful = fastrnn.Stateful(make())
    stateful.reset_state([h.tolist(), (h * 0.5).tolist()] if pair else h.tolist())
    np.testing.assert_array_equal(stateful(x)[0], want)


def test_batch_changes_and_a_changed_model_are_told_by_the_stream():
    lstm = fastrnn.LSTM(3, 4, seed=0)
    stream = fastrnn.Stream(lstm)
    stream(np.ones((5, 2, 3), np.float32))
    with pytest.raises(ValueError, match=r"Stream: the state holds 2 streams, the chunk feeds 3 "
                                         r"\(pass a batch of 2, or reset the stream"):
        stream(np.ones((5, 3, 3), np.float32))
    with pytest.raises(TypeError, match=r"Stream: state must be a list of 1 entry \(one per "
                                        r"recurrent layer; an LSTM's is a tuple \(h, c\)\), "
                                        r"got a tuple of 2"):
        stream.state = stream.state[0]
    model = fastrnn.Sequential([fastrnn.GRU(3, 4, batch_first=True, seed=0)])
    stream = fastrnn.Stream(model)
    stream(np.ones((2, 5, 3), np.float32))
    with pytest.raises(ValueError, match=r"Stream: the state holds 2 streams"):
        stream.step(np.ones(3, np.float32))
    model.add(fastrnn.GRU(4, 4, batch_first=True, seed=1))
    with pytest.raises(ValueError, match=r"Stream: the model's layers changed since the Stream "
                                         r"was made; make a new Stream of it"):
        stream(np.ones((2, 5, 3), np.float32))


def test_stateful_fixes_its_batch_only_by_a_call_that_succeeds():
    stateful = fastrnn.Stateful(fastrnn.GRU(3, 4, seed=0))
    with pytest.raises(ValueError, match=r"GRU: expected input of shape"):
        stateful(np.zeros((2, 5, 4), np.float32))          # wrong feature size
    assert stateful.batch_size is None and stateful.state is None
    with pytest.raises(ValueError, match=r"Stateful: expected a batch of at least one "
                                         r"sequence .* got 0"):
        stateful(np.zeros((2, 0, 3), np.float32))
    stateful(np.zeros((2, 3, 3), np.float32))
    assert stateful.batch_size == 3
    for outer in (fastrnn.Reversed, fastrnn.Stateful):
        with pytest.raises(TypeError, match=rf"{outer.__name__}: layer must not hold a Stateful "
                                            rf"\(a Stateful carries its own state and takes no "
                                            rf"hx, so it goes outermost"):
            outer(fastrnn.Stateful(fastrnn.GRU(3, 4)))


def test_a_wrappers_layer_replaced_is_refused_as_a_changed_model():
    """[failed before] After ``stateful.layer = other`` (which a Stateful
    allows) the Stream went on with the old layer, while the Stateful and
    the model computed with the new one."""
    x = np.random.default_rng(5).standard_normal((2, 6, 3)).astype(np.float32)
    old = fastrnn.GRU(3, 5, batch_first=True, seed=0)
    other = fastrnn.GRU(3, 5, batch_first=True, seed=5)
    stateful = fastrnn.Stateful(old)
    model = fastrnn.Sequential([fastrnn.Stateful(old), fastrnn.Linear(5, 2, seed=1)])
    for streamed, wrapper in ((stateful, stateful), (model, model[0])):
        stream = fastrnn.Stream(streamed)
        stream(x[:, :3])
        wrapper.layer = other
        for fed in (stream, pickle.loads(pickle.dumps(stream))):   # a copy tells it too
            with pytest.raises(ValueError, match=r"Stream: the layer inside Stateful was "
                                                 r"replaced since the Stream was made \(it "
                                                 r"would run the old one\); make a new Stream "
                                                 r"of it"):
                fed(x[:, 3:])
        want = model[1](other(x)[0]) if streamed is model else other(x)[0]
        np.testing.assert_array_equal(fastrnn.Stream(streamed)(x), want)   # a new one: other
        wrapper.layer = old                              # put back: the stream goes on
        stream(x[:, 3:])


def test_a_reversed_mask_is_refused():
    """[failed before] ZeroMasked(reverse=True) flipped the mask within each
    chunk, not over the whole sequence: wrong outputs."""
    model = fastrnn.Sequential([fastrnn.Masking(), fastrnn.GRU(3, 4, batch_first=True, seed=0),
                                fastrnn.ZeroMasked(reverse=True)])
    with pytest.raises(ValueError, match=r"Stream: ZeroMasked\(reverse=True\) zeroes the steps "
                                         r"of the time-reversed mask, whose first step is the "
                                         r"last one fed: it needs the whole sequence, so it "
                                         r"cannot stream"):
        fastrnn.Stream(model)
    model.layers[-1] = fastrnn.ZeroMasked()              # the unreversed one streams
    fastrnn.Stream(model)(np.ones((1, 2, 3), np.float32))


def test_a_malformed_chunk_is_named_by_the_layer_not_blamed_on_the_batch():
    """[failed before] Once the state held a batch, any malformed chunk (None,
    a string, 4-D, the wrong width) was blamed on batching: "the state holds
    2 streams; an unbatched chunk or frame feeds one"."""
    stream = fastrnn.Stream(fastrnn.LSTM(3, 5, batch_first=True, seed=0))
    stream(np.zeros((2, 4, 3), np.float32))
    for chunk, error, message in (
            (None, TypeError, r"LSTM: expected input as an array, got None"),
            ("abc", TypeError, r"LSTM: input must have a real numeric dtype, got <U3"),
            (np.zeros((2, 2, 3, 1)), ValueError, r"LSTM: expected input of shape \(B, T, 3\) "
                                                 r"or \(T, 3\), got \(2, 2, 3, 1\)"),
            (np.zeros((4, 2)), ValueError, r"LSTM: expected input of shape \(B, T, 3\) or "
                                           r"\(T, 3\), got \(4, 2\)")):
        with pytest.raises(error, match=message):
            stream(chunk)
    with pytest.raises(ValueError, match=r"Stream: the state holds 2 streams; an unbatched "
                                         r"chunk or frame feeds one"):
        stream(np.zeros((4, 3), np.float32))             # a chunk it takes, of one stream
    assert stream(np.zeros((2, 1, 3), np.float32)).shape == (2, 1, 5)


def test_a_ragged_state_is_refused_by_name():
    """[failed before] numpy's own "setting an array element with a
    sequence", naming neither Stream nor state."""
    stream = fastrnn.Stream(fastrnn.LSTM(3, 5, seed=0))
    with pytest.raises(TypeError, match=r"Stream: state must be array-like, got list that "
                                        r"numpy cannot convert"):
        stream.state = [([[1, 2], [3]], None)]
    with pytest.raises(TypeError, match=r"Stream: state must be array-like"):
        stream.state = [(np.zeros((1, 5)), [[1, 2], [3]])]
    assert stream.state == [None]                        # left as it was


def test_a_state_given_as_nested_lists_is_the_array_for_rnn_and_gru():
    """An RNN's or GRU's entry as nested lists was split into its rows as if
    it were LSTM's (h, c) pair, and failed only at the next call; an
    LSTM's list entry stays its pair."""
    frame = np.ones(2, np.float32)
    for cls in (fastrnn.GRU, fastrnn.RNN):
        stream = fastrnn.Stream(cls(2, 3, seed=0))
        stream.step(frame)
        saved = stream.state[0]
        want = stream.step(frame)
        stream.state = [saved.tolist()]
        np.testing.assert_array_equal(stream.step(frame), want)
    stream = fastrnn.Stream(fastrnn.LSTM(2, 3, seed=0))
    stream.step(frame)
    h, c = stream.state[0]
    want = stream.step(frame)
    stream.state = [[h, c]]
    np.testing.assert_array_equal(stream.step(frame), want)
