"""Tests of birnn.layers and birnn.models: gradients, the book's semantics, counts, init, I/O.

The reference implementation at the top of this file is written straight from the equations
of the book's code (shared/reference/seed-implementation.md): batch-major, one Python step per
time step, one loop per chain, no stacking or block-diagonal tricks. The models under test
stack their chains into one block-diagonal recurrence, so agreement with this reference is a
real check of that rewrite, not a tautology.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from birnn.layers import accuracy, rnn_backward, rnn_forward, softmax_cross_entropy
from birnn.models import BiRNN, UniRNN, build_model, load_model

# Small sizes for the numerical checks: N samples, T steps, D features, C classes.
N, T, D, C = 4, 5, 3, 4

UNI_NAMES = ["U", "W", "bU", "V", "bV"]
BI_NAMES = ["U1", "W1", "bU1", "U2", "W2", "bU2", "V", "bV"]

# name -> (constructor, tensor names); every model has random data of shape (N, T, D).
MODELS = {
    "uni": (lambda: UniRNN(D, 5, C, seed=1), UNI_NAMES),
    "bi-sum": (lambda: BiRNN(D, 4, 4, C, "sum", seed=2), BI_NAMES),
    "bi-concat": (lambda: BiRNN(D, 4, 4, C, "concat", seed=3), BI_NAMES),
    "bi-mean": (lambda: BiRNN(D, 4, 4, C, "mean", seed=4), BI_NAMES),
    "bi-mul": (lambda: BiRNN(D, 4, 4, C, "mul", seed=5), BI_NAMES),
    "bi-concat-3-5": (lambda: BiRNN(D, 3, 5, C, "concat", seed=6), BI_NAMES),
    "bi-concat-5-3": (lambda: BiRNN(D, 5, 3, C, "concat", seed=7), BI_NAMES),
}
BI_MERGES = ["sum", "concat", "mean", "mul"]


# ------------------------------------------------------------------ helpers


def randomize(model, seed: int, scale: float = 0.5):
    """Give every tensor, biases included, random non-zero values (zero biases hide bugs)."""
    rng = np.random.default_rng(seed)
    model.set_params({k: scale * rng.standard_normal(v.shape) for k, v in model.params.items()})
    return model


def random_data(seed: int, n: int = N, t: int = T, d: int = D, c: int = C):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, t, d)), rng.integers(0, c, n)


def numerical_grad(f, array: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar f() w.r.t. every entry of ``array`` (perturbed in place)."""
    grad = np.zeros_like(array)
    for idx in np.ndindex(array.shape):
        old = array[idx]
        array[idx] = old + eps
        plus = f()
        array[idx] = old - eps
        minus = f()
        array[idx] = old
        grad[idx] = (plus - minus) / (2 * eps)
    return grad


def rel_error(num: np.ndarray, ana: np.ndarray) -> float:
    assert num.shape == ana.shape
    denom = np.max(np.abs(num)) + np.max(np.abs(ana))
    assert denom > 0, "both gradients are zero: the check would prove nothing"
    return float(np.max(np.abs(num - ana)) / denom)


def ref_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def ref_chain(X, U, W, b, reverse: bool):
    """The book's chain, one step at a time: s_t = tanh(x_t U + s_{t-1} W + b), no W term at t=0;
    the reverse chain's step i reads x_{T-1-i}. Returns the list of states."""
    n_steps = X.shape[1]
    states = []
    for i in range(n_steps):
        x = X[:, n_steps - 1 - i, :] if reverse else X[:, i, :]
        h = x @ U + b
        if i > 0:
            h = h + states[-1] @ W
        states.append(np.tanh(h))
    return states


def ref_uni_logits(p, X):
    s = ref_chain(X, p["U"], p["W"], p["bU"], reverse=False)
    return s[-1] @ p["V"] + p["bV"]


def ref_bi_logits(p, X, merge):
    s1 = ref_chain(X, p["U1"], p["W1"], p["bU1"], reverse=False)[-1]
    s2 = ref_chain(X, p["U2"], p["W2"], p["bU2"], reverse=True)[-1]
    if merge == "sum":
        m = s1 + s2
    elif merge == "mean":
        m = (s1 + s2) / 2
    elif merge == "mul":
        m = s1 * s2
    else:
        m = np.hstack([s1, s2])
    return m @ p["V"] + p["bV"]


def ref_uni_grads(p, X, y):
    """BPTT exactly as the book's backward equations for the unidirectional model."""
    n, n_steps, _ = X.shape
    s = ref_chain(X, p["U"], p["W"], p["bU"], reverse=False)
    z = s[-1] @ p["V"] + p["bV"]
    Y = np.zeros_like(z)
    Y[np.arange(n), y] = 1.0
    dz = (ref_softmax(z) - Y) / n                       # a - y, divided by the batch length
    dh = [None] * n_steps
    dh[-1] = (dz @ p["V"].T) * (1 - s[-1] ** 2)
    for t in range(n_steps - 2, -1, -1):
        dh[t] = (dh[t + 1] @ p["W"].T) * (1 - s[t] ** 2)
    grads = {
        "U": sum(X[:, t, :].T @ dh[t] for t in range(n_steps)),
        "W": sum((s[t - 1].T @ dh[t] for t in range(1, n_steps)), np.zeros_like(p["W"])),
        "bU": sum(dh[t].sum(axis=0) for t in range(n_steps)),
        "V": s[-1].T @ dz,
        "bV": dz.sum(axis=0),
    }
    return grads, dz


# ------------------------------------------------------- gradient checks


@pytest.mark.parametrize("case,name", [(c, n) for c, (_, names) in MODELS.items() for n in names])
def test_gradient_matches_finite_differences(case, name):
    make, _ = MODELS[case]
    model = randomize(make(), seed=10)
    X, y = random_data(seed=11)
    logits, cache = model.forward(X)
    _, dlogits = softmax_cross_entropy(logits, y)
    grads = model.backward(cache, dlogits)
    assert set(grads) == set(model.params)
    assert grads[name].shape == model.params[name].shape

    def loss():
        return softmax_cross_entropy(model.forward(X)[0], y)[0]

    num = numerical_grad(loss, model.params[name])
    assert rel_error(num, grads[name]) < 1e-6


@pytest.mark.parametrize("case", ["uni", "bi-mul", "bi-concat-3-5"])
@pytest.mark.parametrize("n,t", [(1, 1), (1, 3), (3, 1)])
def test_gradient_edge_sizes(case, n, t):
    """A single sample and/or a single step (no recurrence at all: dW must be exactly zero)."""
    make, names = MODELS[case]
    model = randomize(make(), seed=12)
    X, y = random_data(seed=13, n=n, t=t)
    logits, cache = model.forward(X)
    assert logits.shape == (n, C)
    grads = model.backward(cache, softmax_cross_entropy(logits, y)[1])

    def loss():
        return softmax_cross_entropy(model.forward(X)[0], y)[0]

    for name in names:
        if t == 1 and name.startswith("W"):
            assert np.array_equal(grads[name], np.zeros_like(model.params[name])), name
            continue
        num = numerical_grad(loss, model.params[name])
        assert rel_error(num, grads[name]) < 1e-6, name


def test_rnn_layer_gradients_wrt_P_and_W():
    rng = np.random.default_rng(20)
    H = 4
    P = rng.standard_normal((T, N, H))
    W = 0.5 * rng.standard_normal((H, H))
    G = rng.standard_normal((N, H))                  # gradient on the final state s_{T-1}

    def loss():
        return float(np.sum(G * rnn_forward(P, W)[-1]))

    S = rnn_forward(P, W)
    assert S.shape == (T, N, H)
    dP, dWs = rnn_backward(G, S, W)
    assert len(dWs) == 1
    assert rel_error(numerical_grad(loss, P), dP) < 1e-6
    assert rel_error(numerical_grad(loss, W), dWs[0]) < 1e-6


def test_rnn_layer_forward_is_the_recurrence():
    rng = np.random.default_rng(21)
    P = rng.standard_normal((T, N, 3))
    W = rng.standard_normal((3, 3))
    S = rnn_forward(P, W)
    s = np.tanh(P[0])                                # no recurrent term at t = 0
    assert np.array_equal(S[0], s)
    for t in range(1, T):
        s = np.tanh(P[t] + s @ W)
        np.testing.assert_allclose(S[t], s, rtol=1e-12, atol=1e-15)


def test_rnn_layer_block_gradients():
    """With a block-diagonal W, each block's dW is the gradient of that block's entries."""
    rng = np.random.default_rng(22)
    blocks = (slice(0, 2), slice(2, 5))
    W = np.zeros((5, 5))
    for b in blocks:
        W[b, b] = 0.5 * rng.standard_normal((b.stop - b.start,) * 2)
    P = rng.standard_normal((T, N, 5))
    G = rng.standard_normal((N, 5))

    def loss():
        return float(np.sum(G * rnn_forward(P, W)[-1]))

    dP, dWs = rnn_backward(G, rnn_forward(P, W), W, blocks)
    num_W = numerical_grad(loss, W)
    assert rel_error(numerical_grad(loss, P), dP) < 1e-6
    assert len(dWs) == 2
    for b, dW in zip(blocks, dWs):
        assert rel_error(num_W[b, b], dW) < 1e-6


def test_softmax_cross_entropy_value_and_gradient():
    rng = np.random.default_rng(30)
    logits = rng.standard_normal((6, 5)) * 3
    labels = rng.integers(0, 5, 6)
    loss, dlogits = softmax_cross_entropy(logits, labels)
    a = ref_softmax(logits)
    assert loss == pytest.approx(-np.mean(np.log(a[np.arange(6), labels])), rel=1e-12)
    Y = np.eye(5)[labels]
    np.testing.assert_allclose(dlogits, (a - Y) / 6, rtol=1e-12, atol=1e-15)
    num = numerical_grad(lambda: softmax_cross_entropy(logits, labels)[0], logits)
    assert rel_error(num, dlogits) < 1e-6


def test_softmax_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1000.0, 0.0, -1000.0], [-800.0, 800.0, 0.0]])
    loss, dlogits = softmax_cross_entropy(logits, np.array([0, 2]))
    assert loss == pytest.approx(800.0 / 2)          # 0 for the first row, 800 for the second
    assert np.all(np.isfinite(dlogits))
    np.testing.assert_allclose(dlogits, [[0, 0, 0], [0, 0.5, -0.5]], atol=1e-15)


def test_accuracy():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert accuracy(logits, np.array([1, 0, 0, 0])) == 0.75


# --------------------------------------------------------------- semantics


def test_bi_sum_with_zero_reverse_chain_is_uni():
    bi = randomize(BiRNN(D, 5, 5, C, "sum", seed=40), seed=41)
    p = dict(bi.params)
    for name in ("U2", "W2", "bU2"):
        p[name] = np.zeros_like(p[name])
    bi.set_params(p)
    uni = UniRNN(D, 5, C, seed=42)
    uni.set_params({"U": p["U1"], "W": p["W1"], "bU": p["bU1"], "V": p["V"], "bV": p["bV"]})
    X, _ = random_data(seed=43)
    np.testing.assert_allclose(bi.forward(X)[0], uni.forward(X)[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("merge,h1,h2", [("sum", 4, 4), ("mean", 4, 4), ("mul", 4, 4),
                                         ("concat", 4, 4), ("concat", 3, 5)])
def test_bi_reversed_input_with_swapped_chains_gives_same_logits(merge, h1, h2):
    a = randomize(BiRNN(D, h1, h2, C, merge, seed=50), seed=51)
    b = BiRNN(D, h2, h1, C, merge, seed=52)
    p = a.params
    swapped = {"U1": p["U2"], "W1": p["W2"], "bU1": p["bU2"],
               "U2": p["U1"], "W2": p["W1"], "bU2": p["bU1"], "bV": p["bV"]}
    # concat: merged = [s1, s2] @ V, so the swapped model needs V's row blocks swapped
    swapped["V"] = np.vstack([p["V"][h1:], p["V"][:h1]]) if merge == "concat" else p["V"]
    b.set_params(swapped)
    X, _ = random_data(seed=53)
    la = a.forward(X)[0]
    lb = b.forward(X[:, ::-1, :])[0]
    np.testing.assert_allclose(lb, la, rtol=1e-12, atol=1e-14)
    # and the test is not vacuous: without reversing the input the logits differ
    assert not np.allclose(b.forward(X)[0], la)


def test_uni_forward_matches_reference():
    model = randomize(UniRNN(D, 5, C, seed=60), seed=61)
    X, _ = random_data(seed=62)
    logits, _ = model.forward(X)
    np.testing.assert_allclose(logits, ref_uni_logits(model.params, X), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("merge,h1,h2", [(m, 4, 4) for m in BI_MERGES] + [("concat", 3, 5)])
def test_bi_forward_matches_reference(merge, h1, h2):
    model = randomize(BiRNN(D, h1, h2, C, merge, seed=63), seed=64)
    X, _ = random_data(seed=65)
    logits, _ = model.forward(X)
    assert logits.shape == (N, C)
    np.testing.assert_allclose(logits, ref_bi_logits(model.params, X, merge), rtol=1e-12, atol=1e-14)


def test_bi_reverse_chain_reads_reversed_sequence():
    """Guard against a reference/model agreeing by accident: a reverse chain that read the
    sequence forwards would give different logits on random data."""
    model = randomize(BiRNN(D, 4, 4, C, "sum", seed=66), seed=67)
    X, _ = random_data(seed=68)
    p = model.params
    s1 = ref_chain(X, p["U1"], p["W1"], p["bU1"], reverse=False)[-1]
    s2_wrong = ref_chain(X, p["U2"], p["W2"], p["bU2"], reverse=False)[-1]
    assert not np.allclose(model.forward(X)[0], (s1 + s2_wrong) @ p["V"] + p["bV"])


def test_uni_backward_matches_hand_derived_bptt():
    model = randomize(UniRNN(D, 5, C, seed=70), seed=71)
    X, y = random_data(seed=72, n=6, t=7)
    ref, dz = ref_uni_grads(model.params, X, y)
    logits, cache = model.forward(X)
    _, dlogits = softmax_cross_entropy(logits, y)
    np.testing.assert_allclose(dlogits, dz, rtol=1e-12, atol=1e-15)
    grads = model.backward(cache, dz)
    assert set(grads) == set(UNI_NAMES)
    for name in UNI_NAMES:
        np.testing.assert_allclose(grads[name], ref[name], rtol=1e-10, atol=1e-13, err_msg=name)


def test_forward_does_not_modify_input_or_params():
    model = randomize(BiRNN(D, 4, 4, C, "mul", seed=73), seed=74)
    X, y = random_data(seed=75)
    X0 = X.copy()
    p0 = {k: v.copy() for k, v in model.params.items()}
    logits, cache = model.forward(X)
    model.backward(cache, softmax_cross_entropy(logits, y)[1])
    assert np.array_equal(X, X0)
    for k in p0:
        assert np.array_equal(model.params[k], p0[k]), k


# ---------------------------------------------------- counts, keys, shapes


def test_uni_param_count_as_the_book():
    counts = UniRNN(28, 32, 10).param_count()
    assert counts == {"U": 896, "W": 1024, "bU": 32, "V": 320, "bV": 10, "total": 2282}


@pytest.mark.parametrize("merge,total", [("sum", 2170), ("concat", 2370), ("mean", 2170), ("mul", 2170)])
def test_bi_param_count(merge, total):
    counts = BiRNN(28, 20, 20, 10, merge).param_count()
    assert counts["total"] == total
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")


def test_uni_params_keys_and_shapes():
    params = UniRNN().params                          # defaults: the book's 28, 32, 10
    assert list(params) == UNI_NAMES
    shapes = {k: v.shape for k, v in params.items()}
    assert shapes == {"U": (28, 32), "W": (32, 32), "bU": (32,), "V": (32, 10), "bV": (10,)}


@pytest.mark.parametrize("merge,v_rows", [("sum", 20), ("concat", 40)])
def test_bi_params_keys_and_shapes(merge, v_rows):
    params = BiRNN(merge=merge).params                # defaults: the book's 28, 20 + 20, 10
    assert list(params) == BI_NAMES
    shapes = {k: v.shape for k, v in params.items()}
    assert shapes == {"U1": (28, 20), "W1": (20, 20), "bU1": (20,),
                      "U2": (28, 20), "W2": (20, 20), "bU2": (20,),
                      "V": (v_rows, 10), "bV": (10,)}


def test_bi_concat_unequal_shapes():
    shapes = {k: v.shape for k, v in BiRNN(7, 3, 5, 6, "concat").params.items()}
    assert shapes == {"U1": (7, 3), "W1": (3, 3), "bU1": (3,), "U2": (7, 5), "W2": (5, 5),
                      "bU2": (5,), "V": (8, 6), "bV": (6,)}


def test_build_model():
    assert isinstance(build_model("uni", hidden_size=7), UniRNN)
    bi = build_model("bi", hidden_fwd=3, hidden_bwd=5, merge="concat")
    assert isinstance(bi, BiRNN) and bi.params["V"].shape == (8, 10)
    with pytest.raises(ValueError):
        build_model("lstm")


# ---------------------------------------------------------- initialisation


def _check_std(array, expected, tol):
    assert abs(array.std() / expected - 1) < tol, (array.std(), expected)
    assert abs(array.mean()) < 5 * expected / np.sqrt(array.size)


def test_uni_init_std_is_one_over_sqrt_fan_in():
    # fan_in differs from fan_out for every tensor, so the wrong convention would show
    p = UniRNN(400, 200, 50, seed=80).params
    _check_std(p["U"], 1 / np.sqrt(400), 0.03)         # 80 000 draws
    _check_std(p["W"], 1 / np.sqrt(200), 0.03)         # 40 000 draws
    _check_std(p["V"], 1 / np.sqrt(200), 0.05)         # 10 000 draws
    assert np.array_equal(p["bU"], np.zeros(200)) and np.array_equal(p["bV"], np.zeros(50))


def test_bi_init_std_is_one_over_sqrt_fan_in():
    p = BiRNN(400, 200, 100, 50, "concat", seed=81).params
    _check_std(p["U1"], 1 / np.sqrt(400), 0.03)
    _check_std(p["U2"], 1 / np.sqrt(400), 0.03)
    _check_std(p["W1"], 1 / np.sqrt(200), 0.03)
    _check_std(p["W2"], 1 / np.sqrt(100), 0.05)
    _check_std(p["V"], 1 / np.sqrt(300), 0.05)
    for b, size in (("bU1", 200), ("bU2", 100), ("bV", 50)):
        assert np.array_equal(p[b], np.zeros(size)), b


@pytest.mark.parametrize("make", [lambda s: UniRNN(seed=s), lambda s: BiRNN(seed=s),
                                  lambda s: BiRNN(merge="concat", seed=s)])
def test_init_seeding(make):
    a, b, c = make(5).params, make(5).params, make(6).params
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    for k in a:
        if not k.startswith("b"):
            assert not np.array_equal(a[k], c[k]), k
    # the two chains of a bidirectional model are not initialised alike
    if "U1" in a:
        assert not np.array_equal(a["U1"], a["U2"])


def test_init_accepts_a_generator():
    a = UniRNN(seed=np.random.default_rng(9)).params
    b = UniRNN(seed=9).params
    for k in a:
        assert np.array_equal(a[k], b[k]), k


@pytest.mark.parametrize("make", [lambda **kw: UniRNN(D, 5, C, **kw),
                                  lambda **kw: BiRNN(D, 3, 5, C, "concat", **kw)])
def test_float32_model(make):
    m64, m32 = make(seed=8), make(seed=8, dtype="float32")
    for k, v in m64.params.items():
        assert m32.params[k].dtype == np.float32, k
        assert np.array_equal(m32.params[k], v.astype(np.float32)), k
    X, y = random_data(seed=90)
    logits, cache = m32.forward(X)                    # float64 input, float32 model
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, m64.forward(X)[0], rtol=1e-4, atol=1e-5)
    grads = m32.backward(cache, softmax_cross_entropy(logits, y)[1])
    for k, g in grads.items():
        assert g.dtype == np.float32, k


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("merge", ["sum", "mean", "mul"])
def test_unequal_hidden_sizes_need_concat(merge):
    with pytest.raises(ValueError, match="equal hidden sizes"):
        BiRNN(28, 20, 30, 10, merge)
    BiRNN(28, 20, 30, 10, "concat")                   # fine


@pytest.mark.parametrize("merge", ["max", "Sum", "", None])
def test_unknown_merge(merge):
    with pytest.raises(ValueError, match="merge"):
        BiRNN(merge=merge)


@pytest.mark.parametrize("make,arg", [
    (lambda v: UniRNN(input_size=v), "input_size"),
    (lambda v: UniRNN(hidden_size=v), "hidden_size"),
    (lambda v: UniRNN(num_classes=v), "num_classes"),
    (lambda v: BiRNN(input_size=v), "input_size"),
    (lambda v: BiRNN(hidden_fwd=v, merge="concat"), "hidden_fwd"),
    (lambda v: BiRNN(hidden_bwd=v, merge="concat"), "hidden_bwd"),
    (lambda v: BiRNN(num_classes=v), "num_classes"),
])
@pytest.mark.parametrize("value", [0, -3])
def test_non_positive_sizes(make, arg, value):
    with pytest.raises(ValueError, match=arg):
        make(value)


def test_unsupported_dtype():
    with pytest.raises(ValueError, match="dtype"):
        UniRNN(dtype="float16")


@pytest.mark.parametrize("shape", [(4, 28), (4, 5, 27), (4, 5, 29), (2, 4, 5, 28), (28,)])
@pytest.mark.parametrize("make", [lambda: UniRNN(), lambda: BiRNN()])
def test_forward_rejects_wrong_input_shape(make, shape):
    with pytest.raises(ValueError):
        make().forward(np.zeros(shape))


# --------------------------------------------------------------- save/load


@pytest.mark.parametrize("make", [
    lambda: UniRNN(D, 5, C, seed=100),
    lambda: UniRNN(D, 5, C, seed=101, dtype="float32"),
    lambda: BiRNN(D, 4, 4, C, "mean", seed=102),
    lambda: BiRNN(D, 3, 5, C, "concat", seed=103),
])
def test_save_load_round_trip(tmp_path, make):
    model = randomize(make(), seed=104)
    path = tmp_path / "sub" / "model.npz"
    model.save(path)
    loaded = load_model(path)
    assert type(loaded) is type(model)
    assert loaded.config == model.config
    assert loaded.dtype == model.dtype
    assert list(loaded.params) == list(model.params)
    for k, v in model.params.items():
        assert loaded.params[k].dtype == v.dtype, k
        assert np.array_equal(loaded.params[k], v), k
    X, _ = random_data(seed=105)
    assert np.array_equal(loaded.forward(X)[0], model.forward(X)[0])
    # load_params into a fresh model of the same configuration
    fresh = make()
    fresh.load_params(path)
    for k, v in model.params.items():
        assert np.array_equal(fresh.params[k], v), k


def test_load_params_wrong_shape(tmp_path):
    path = tmp_path / "uni.npz"
    UniRNN(D, 4, C, seed=110).save(path)
    other = UniRNN(D, 5, C, seed=111)
    before = {k: v.copy() for k, v in other.params.items()}
    with pytest.raises(ValueError) as info:
        other.load_params(path)
    msg = str(info.value)
    assert re.search(r"\bU\b", msg), msg               # the first tensor that differs
    assert str((D, 4)) in msg and str((D, 5)) in msg, msg
    assert str(path) in msg, msg
    for k, v in before.items():                       # nothing half-loaded
        assert np.array_equal(other.params[k], v), k


def test_load_params_other_tensors(tmp_path):
    path = tmp_path / "uni.npz"
    UniRNN(D, 4, C).save(path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        BiRNN(D, 4, 4, C).load_params(path)


def _corrupt(kind: str, tmp_path):
    path = tmp_path / f"{kind}.npz"
    if kind == "missing":
        return path
    if kind == "text":
        path.write_text("not an npz file\n")
        return path
    if kind == "empty":
        path.write_bytes(b"")
        return path
    if kind == "npz-without-config":
        np.savez(path, U=np.zeros((3, 4)))
        return path
    model = UniRNN(D, 4, C, seed=120)
    model.save(path)
    raw = bytearray(path.read_bytes())
    if kind == "truncated":
        path.write_bytes(bytes(raw[: len(raw) // 2]))
    elif kind == "bit-flip":                          # inside U's data: the member's CRC fails
        at = bytes(raw).find(model.params["U"].tobytes())
        assert at > 0
        raw[at + 5] ^= 0xFF
        path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("kind", ["missing", "text", "empty", "npz-without-config",
                                  "truncated", "bit-flip"])
@pytest.mark.parametrize("loader", ["load_model", "load_params"])
def test_load_bad_file_is_a_value_error_naming_the_path(tmp_path, kind, loader):
    path = _corrupt(kind, tmp_path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        if loader == "load_model":
            load_model(path)
        else:
            UniRNN(D, 4, C).load_params(path)
