"""Tests of birnn.training: schedules, checkpoints, the best-parameter rule, determinism,
divergence, evaluation, uint8 pixels scaled batch by batch (bit-identical, and without a float
copy of the training set), and a short training on real MNIST that has to learn."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import birnn.training
from birnn.data import load_mnist, scale_pixels, shuffle_split
from birnn.layers import softmax_cross_entropy
from birnn.models import BiRNN, UniRNN
from birnn.training import DivergenceError, LRSchedule, TrainSettings, evaluate, train

ROOT = Path(__file__).resolve().parent.parent
MNIST = ROOT / "data" / "raw" / "mnist"
T, D, C = 5, 3, 4


# ------------------------------------------------------------------ helpers


def synthetic(n: int, seed: int):
    """Random sequences whose label is learnable: the argmax of the summed first C features."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, T, D + 2))[:, :, :D]
    w = rng.standard_normal((D, C))
    y = np.argmax(x.sum(axis=1) @ w, axis=1)
    return x, y


def small_uni(seed=0):
    return UniRNN(D, 4, C, seed=seed)


def small_bi(seed=0):
    return BiRNN(D, 3, 4, C, "concat", seed=seed)


def copy_params(model):
    return {k: v.copy() for k, v in model.params.items()}


def params_equal(a, b):
    return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def run(model, x, y, vx, vy, recorder=None, **settings):
    return train(model, x, y, vx, vy, TrainSettings(**settings), on_checkpoint=recorder, log=None)


# -------------------------------------------------------------- LRSchedule


BOOK_BI = {30: 0.008, 50: 0.005, 70: 0.002}


@pytest.mark.parametrize("epoch,lr", [(0, 0.01), (29, 0.01), (30, 0.008), (49, 0.008),
                                      (50, 0.005), (69, 0.005), (70, 0.002), (99, 0.002)])
def test_book_bidirectional_schedule(epoch, lr):
    assert LRSchedule(0.01, BOOK_BI).at(epoch) == lr
    # the order in which the milestones are given does not matter
    assert LRSchedule(0.01, dict(reversed(list(BOOK_BI.items())))).at(epoch) == lr


def test_constant_schedule():
    s = TrainSettings(lr=0.005)
    assert isinstance(s.lr, LRSchedule)
    assert [s.lr.at(e) for e in (0, 1, 50, 99)] == [0.005] * 4


@pytest.mark.parametrize("bad", [-0.01, 0.0, math.nan, math.inf])
def test_invalid_learning_rates(bad):
    with pytest.raises(ValueError):
        LRSchedule(bad)
    with pytest.raises(ValueError):
        LRSchedule(0.01, {30: bad})
    with pytest.raises(ValueError):
        TrainSettings(lr=bad)


@pytest.mark.parametrize("epoch", [-1, 2.5])
def test_invalid_milestone_epochs(epoch):
    with pytest.raises(ValueError):
        LRSchedule(0.01, {epoch: 0.005})


# ------------------------------------------------------------ TrainSettings


@pytest.mark.parametrize("kwargs", [{"epochs": 0}, {"epochs": -1}, {"batch_size": 0},
                                    {"batch_size": -5}, {"checkpoint_every": 0},
                                    {"checkpoint_every": -0.5},
                                    {"epochs": 2, "checkpoint_every": 3}])
def test_invalid_settings(kwargs):
    with pytest.raises(ValueError):
        TrainSettings(**kwargs)


def test_book_defaults():
    s = TrainSettings()
    assert (s.epochs, s.batch_size, s.checkpoint_every) == (100, 128, 0.5)
    assert s.lr.at(0) == s.lr.at(99) == 0.005


def test_empty_sets_are_rejected():
    x, y = synthetic(20, seed=1)
    with pytest.raises(ValueError):
        run(small_uni(), x[:0], y[:0], x, y, epochs=1)
    with pytest.raises(ValueError):
        run(small_uni(), x, y, x[:0], y[:0], epochs=1)


# ------------------------------------------------------ checkpoint schedule


def test_checkpoint_schedule_half_epoch():
    # N = 1000, batch 128: 8 batches an epoch (the last has 104), a checkpoint every 4
    x, y = synthetic(1000, seed=2)
    vx, vy = synthetic(50, seed=3)
    got = []
    result = run(small_uni(), x, y, vx, vy, got.append, epochs=2, batch_size=128,
                 checkpoint_every=0.5, lr=LRSchedule(0.05, {1: 0.02}))
    assert [c.iteration for c in got] == [3, 7, 11, 15]
    assert [c.epoch for c in got] == [0, 0, 1, 1]
    assert [c.lr for c in got] == [0.05, 0.05, 0.02, 0.02]
    assert result.history == got


def test_checkpoint_interval_is_truncated():
    # N = 800, batch 128: 7 batches an epoch, 0.5 epoch = 3.5 batches -> every 3 iterations
    # (int(), not round(): 430 * 0.5 = 215 in the book), across the epoch boundary
    x, y = synthetic(800, seed=2)
    vx, vy = synthetic(50, seed=3)
    got = []
    run(small_uni(), x, y, vx, vy, got.append, epochs=2, batch_size=128, checkpoint_every=0.5)
    assert [(c.epoch, c.iteration) for c in got] == [(0, 2), (0, 5), (1, 8), (1, 11)]


def test_checkpoint_schedule_whole_epochs():
    x, y = synthetic(1000, seed=2)
    vx, vy = synthetic(50, seed=3)
    got = []
    run(small_uni(), x, y, vx, vy, got.append, epochs=3, batch_size=128, checkpoint_every=1)
    assert [(c.epoch, c.iteration) for c in got] == [(0, 7), (1, 15), (2, 23)]


class _StubModel:
    """Costs nothing per step, so the real training loop can be run at the book's size."""

    dtype = np.dtype("float64")
    config = {"num_classes": 2}

    def __init__(self):
        self.params = {"V": np.zeros(1)}
        self.batch_sizes = []

    def forward(self, x):
        self.batch_sizes.append(len(x))
        return np.zeros((len(x), 2)), None

    def backward(self, cache, dlogits):
        return {"V": np.zeros(1)}

    def predict_logits(self, x, batch_size=5000):
        return np.zeros((len(x), 2))


def test_book_checkpoint_schedule():
    """55 000 samples, batch 128: 430 iterations an epoch (the last of 88), a checkpoint every
    215; 100 epochs: 43 000 updates and 200 checkpoints, the last at iteration 42 999."""
    assert math.ceil(55000 / 128) == 430 and 55000 - 429 * 128 == 88
    model = _StubModel()
    got = []
    run(model, np.zeros((55000, 1, 1)), np.zeros(55000, dtype=int),
        np.zeros((3, 1, 1)), np.zeros(3, dtype=int), got.append)   # TrainSettings() defaults
    assert len(model.batch_sizes) == 43000
    assert model.batch_sizes[:430] == [128] * 429 + [88]
    assert len(got) == 200
    assert [c.iteration for c in got[:3]] == [214, 429, 644]
    assert got[-1].iteration == 42999 and got[-1].epoch == 99
    assert all(c.iteration == 215 * (i + 1) - 1 for i, c in enumerate(got))
    assert all(c.epoch == c.iteration // 430 for c in got)


# ------------------------------------------------- last partial batch, SGD


def manual_sgd(model, x, y, epochs, batch_size, lr_at, seed):
    """Plain SGD written from the book's description, to compare with ``train`` bit for bit."""
    rng = np.random.default_rng(seed)
    with threadpool_limits(limits=1, user_api="blas"):
        for epoch in range(epochs):
            order = rng.permutation(len(x))
            for first in range(0, len(x), batch_size):
                batch = order[first:first + batch_size]
                logits, cache = model.forward(x[batch])
                _, dlogits = softmax_cross_entropy(logits, y[batch])   # / len(batch)
                for name, grad in model.backward(cache, dlogits).items():
                    model.params[name] -= lr_at(epoch) * grad
    return model.params


@pytest.mark.parametrize("make", [small_uni, small_bi])
def test_training_is_plain_sgd_with_own_length_last_batch(make):
    # N = 130, batch 128: every epoch ends with a batch of 2, averaged over 2 (not 128)
    x, y = synthetic(130, seed=4)
    vx, vy = synthetic(20, seed=5)
    schedule = LRSchedule(0.5, {2: 0.1})
    model = make(seed=6)
    run(model, x, y, vx, vy, epochs=3, batch_size=128, lr=schedule, seed=7)
    expected = manual_sgd(make(seed=6), x, y, 3, 128, schedule.at, seed=7)
    assert params_equal(model.params, expected)


def test_last_batch_is_averaged_over_its_own_length_spy(monkeypatch):
    """Spy on the loss: the last batch reaches it as it is, 2 samples (not padded, not dropped)."""
    x, y = synthetic(130, seed=4)
    seen = []
    real = birnn.training.softmax_cross_entropy

    def spy(logits, labels):
        loss, dlogits = real(logits, labels)
        seen.append(len(labels))
        return loss, dlogits

    monkeypatch.setattr(birnn.training, "softmax_cross_entropy", spy)
    run(small_uni(), x, y, x[:10], y[:10], epochs=1, batch_size=128, checkpoint_every=1)
    assert seen == [128, 2, 10]                        # two batches, then the validation set


# --------------------------------------------------------- best parameters


def recorder(model):
    """(checkpoints, parameter snapshots, callback): the callback appends each checkpoint
    and a copy of the model's parameters at that moment."""
    got, snapshots = [], []

    def record(c):
        got.append(c)
        snapshots.append(copy_params(model))

    return got, snapshots, record


def test_best_parameters_rule():
    x, y = synthetic(1000, seed=8)
    vx, vy = synthetic(200, seed=9)
    model = small_bi(seed=10)
    got, snapshots, record = recorder(model)
    # a rate high enough that the validation loss goes up and down: the best is not the last
    result = run(model, x, y, vx, vy, record, epochs=4, batch_size=128, lr=1.0)
    assert len(got) == 8
    assert result.history == got
    losses = [c.val_loss for c in got]
    first_best = losses.index(min(losses))
    assert first_best < 7, "the best being the last checkpoint would make this test weak"
    assert not params_equal(result.best_params, result.last_params)
    assert result.best == got[first_best]
    assert params_equal(result.best_params, snapshots[first_best])
    assert params_equal(result.last_params, model.params)
    # copies, not views of the live model
    model.params["V"] += 1.0
    assert not params_equal(result.last_params, model.params)
    assert params_equal(result.best_params, snapshots[first_best])
    # the checkpoint's numbers are those of the validation set at that moment
    check = small_bi()
    check.set_params(result.best_params)
    logits = check.predict_logits(vx)
    assert result.best.val_loss == pytest.approx(softmax_cross_entropy(logits, vy)[0], rel=1e-12)
    assert result.best.val_acc == np.mean(logits.argmax(axis=1) == vy)


def test_best_is_strictly_lower_ties_keep_the_earlier(monkeypatch):
    """Scripted validation losses (the training itself is real): the lowest one wins, and of two
    equal losses the earlier checkpoint is kept."""
    scripted = iter([0.9, 0.5, 0.5, 0.7, 0.3, 0.3, 0.4, 0.8])
    monkeypatch.setattr(birnn.training, "_loss_and_accuracy",
                        lambda model, x, y: (next(scripted), 0.5))
    x, y = synthetic(1000, seed=11)
    model = small_uni(seed=12)
    got, snapshots, record = recorder(model)
    result = run(model, x, y, x[:10], y[:10], record, epochs=4, batch_size=128, lr=0.1)
    assert [c.val_loss for c in got] == [0.9, 0.5, 0.5, 0.7, 0.3, 0.3, 0.4, 0.8]
    assert result.best is got[4]
    assert params_equal(result.best_params, snapshots[4])
    assert not params_equal(result.best_params, snapshots[5])   # so the tie was really decided
    assert params_equal(result.last_params, snapshots[7])


# ------------------------------------------------------------- determinism


@pytest.mark.parametrize("make", [small_uni, small_bi])
def test_training_is_deterministic(make):
    x, y = synthetic(300, seed=13)
    vx, vy = synthetic(50, seed=14)
    kw = dict(epochs=3, batch_size=32, lr=0.2)
    a = run(make(seed=1), x, y, vx, vy, seed=5, **kw)
    b = run(make(seed=1), x, y, vx, vy, seed=5, **kw)
    assert params_equal(a.last_params, b.last_params)
    assert params_equal(a.best_params, b.best_params)
    assert a.history == b.history and a.best == b.best
    c = run(make(seed=1), x, y, vx, vy, seed=6, **kw)            # other shuffling only
    assert not params_equal(a.last_params, c.last_params)
    assert a.history != c.history


# --------------------------------------------------------------- divergence


# Overflow warnings from numpy on the way to inf are expected; any exception other than
# DivergenceError fails the test.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("make", [small_uni, small_bi])
def test_divergence_is_reported(make):
    # A tanh RNN's gradients are bounded, so only a rate that makes the weights overflow
    # produces non-finite numbers; it starts at epoch 2 so the epoch in the message matters.
    x, y = synthetic(64, seed=15)
    got = []
    with pytest.raises(DivergenceError) as info:
        run(make(), x, y, x[:16], y[:16], got.append, epochs=6, batch_size=16,
            lr=LRSchedule(0.01, {2: 1e308}))
    msg = str(info.value)
    match = re.search(r"epoch (\d+), iteration (\d+)", msg)
    assert match, msg
    epoch, iteration = int(match.group(1)), int(match.group(2))
    assert epoch >= 2 and iteration // 4 == epoch, msg            # 4 batches an epoch
    assert all(math.isfinite(c.val_loss) for c in got)
    assert all(c.iteration < iteration for c in got)


@pytest.mark.parametrize("make", [small_uni, small_bi])
def test_finite_but_exploding_loss_counts_as_divergence(make):
    # lr 1e6 keeps every number finite (tanh bounds the gradients) but the loss explodes:
    # max_loss turns that into a DivergenceError; without the bound training "succeeds".
    x, y = synthetic(64, seed=15)
    with pytest.raises(DivergenceError, match=r"diverged"):
        run(make(), x, y, x[:16], y[:16], epochs=4, batch_size=16, lr=1e6)
    result = run(make(), x, y, x[:16], y[:16], epochs=4, batch_size=16, lr=1e6, max_loss=None)
    assert max(c.train_loss for c in result.history) > 1000


def test_max_loss_must_be_positive():
    with pytest.raises(ValueError, match="max_loss"):
        TrainSettings(max_loss=0.0)


# --------------------------------------------------------------- evaluate


def test_evaluate():
    x, y = synthetic(300, seed=16)
    y[y == 3] = 2                                     # class 3 never occurs: its accuracy is nan
    model = small_bi(seed=17)
    model.set_params({k: np.random.default_rng(18).standard_normal(v.shape)
                      for k, v in model.params.items()})
    result = evaluate(model, x, y)
    logits = model.predict_logits(x)
    pred = logits.argmax(axis=1)
    assert len(np.unique(pred)) > 1, "a constant predictor would make this test weak"
    assert np.array_equal(result.predictions, pred)
    conf = result.confusion
    assert conf.shape == (C, C) and conf.sum() == len(y)
    for i in range(C):
        for j in range(C):
            assert conf[i, j] == np.sum((y == i) & (pred == j))       # rows: true class
    assert np.array_equal(conf.sum(axis=1), np.bincount(y, minlength=C))
    rows = conf.sum(axis=1)
    np.testing.assert_array_equal(result.per_class_accuracy[:3], conf.diagonal()[:3] / rows[:3])
    assert math.isnan(result.per_class_accuracy[3])
    assert result.accuracy == pytest.approx(np.trace(conf) / len(y), abs=1e-15)
    assert result.accuracy == np.mean(pred == y)
    assert result.loss == pytest.approx(softmax_cross_entropy(logits, y)[0], rel=1e-12)


# -------------------------------------------------------------- real MNIST


@pytest.fixture(scope="module")
def mnist_small():
    """uint8 pixels (N, 28, 28), as the train stage passes them."""
    images, labels = load_mnist(MNIST, "train")
    tx, ty, vx, vy = shuffle_split(images, labels, seed=0)
    assert tx.dtype == vx.dtype == np.uint8
    return tx[:4000], ty[:4000], vx[:1000], vy[:1000]


@pytest.mark.parametrize("make", [lambda: UniRNN(seed=0), lambda: BiRNN(seed=0)],
                         ids=["uni", "bi"])
def test_short_training_on_mnist_learns(mnist_small, make):
    # Measured (seeds 0-5, 20 epochs, batch 16, lr 0.02): validation accuracy of the best
    # checkpoint 0.74-0.81 (uni), 0.80-0.87 (bi); chance is 0.1 and ln 10 = 2.30 the loss.
    # Rates of 0.05-0.1 are unstable here (one seed fell back to 0.09).
    tx, ty, vx, vy = mnist_small
    model = make()
    result = run(model, tx, ty, vx, vy, epochs=20, batch_size=16, lr=0.02, checkpoint_every=1)
    assert result.history[0].val_loss > result.best.val_loss
    model.set_params(result.best_params)
    ev = evaluate(model, vx, vy)
    assert ev.accuracy == result.best.val_acc
    assert ev.accuracy > 0.65
    assert ev.loss < 1.2


def test_progress_line_keeps_the_books_fields_and_says_where_it_is():
    from birnn.training import Checkpoint, progress_line

    c = Checkpoint(epoch=36, iteration=15909, lr=0.005, train_loss=0.3, train_acc=0.9,
                   val_loss=0.25, val_acc=0.93)
    line = progress_line(c, epochs=100, total_iterations=43000, elapsed=318.0)
    assert line.startswith("36:15909:0.005000 loss=0.250000, acc=0.930000 (train batch")
    # 15,910 of 43,000 done in 318 s: 27,090 left at 0.01999 s each, about 541 s
    # one counting convention: the indices are 0-based; the rest is a count, not an index
    assert line.endswith("| 15,910 of 43,000 iterations done (37% of 100 epochs), "
                         "0:05:18 elapsed, about 0:09:01 left")
    assert "epoch 37" not in line
    assert "\n" not in line


# ------------------------------------------------- uint8 pixels, scaled per batch


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("make", [UniRNN, BiRNN], ids=["uni", "bi"])
def test_pixels_scaled_per_batch_train_bit_identically(mnist_small, make, dtype):
    """uint8 images scaled batch by batch give the very parameters and checkpoints of the
    whole set scaled first (what the train stage did before): x / 255 is elementwise."""
    tx, ty, vx, vy = mnist_small
    tx, ty = tx[:600], ty[:600]                       # batch 128: a last batch of 88, as the book's
    kw = dict(epochs=2, batch_size=128, lr=0.05, checkpoint_every=0.5, seed=3)
    pixels = run(make(seed=1, dtype=dtype), tx, ty, vx, vy, **kw)
    scaled = run(make(seed=1, dtype=dtype), scale_pixels(tx, dtype), ty,
                 scale_pixels(vx, dtype), vy, **kw)
    assert len(pixels.history) == 5                  # every 2 of the 5 batches an epoch
    assert pixels.history == scaled.history           # val loss and accuracy: exact floats
    assert params_equal(pixels.last_params, scaled.last_params)
    assert params_equal(pixels.best_params, scaled.best_params)
    assert pixels.last_params["V"].dtype == dtype
    # and not because the pixels made no difference: unscaled they train elsewhere
    raw = run(make(seed=1, dtype=dtype), tx.astype(dtype), ty, vx.astype(dtype), vy, **kw)
    assert not params_equal(raw.last_params, pixels.last_params)


def test_evaluate_scales_pixels(mnist_small):
    _, _, vx, vy = mnist_small
    model = BiRNN(seed=2)
    on_pixels, on_scaled = evaluate(model, vx, vy), evaluate(model, scale_pixels(vx), vy)
    assert on_pixels.loss == on_scaled.loss
    assert np.array_equal(on_pixels.predictions, on_scaled.predictions)
    assert np.array_equal(on_pixels.confusion, on_scaled.confusion)


@pytest.mark.parametrize("dtype", [np.int64, np.uint16, bool])
def test_integer_inputs_other_than_uint8_are_refused(dtype):
    # pixels of another range, or integer features: ambiguous, so not fed to the model as they are
    x, y = synthetic(20, seed=1)
    ints = (x > 0).astype(dtype)
    with pytest.raises(ValueError, match=r"^train_x must be uint8 pixels or floats, got dtype"):
        run(small_uni(), ints, y, x, y, epochs=1)
    with pytest.raises(ValueError, match=r"^val_x must be uint8 pixels or floats"):
        run(small_uni(), x, y, ints, y, epochs=1)
    with pytest.raises(ValueError, match=r"^x must be uint8 pixels or floats"):
        evaluate(small_uni(), ints, y)


def test_training_keeps_pixels_uint8():
    """No float copy of the training set: numpy's allocations during train() (tracemalloc
    sees them) stay far below one. 20,000 images: 16 MB as uint8, 125 MB as float64."""
    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, (20000, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, 20000)
    float_copy = x.size * np.dtype("float64").itemsize
    tracemalloc.start()
    try:
        run(UniRNN(hidden_size=4, seed=0), x, y, x[:100], y[:100], epochs=1, batch_size=500,
            checkpoint_every=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < float_copy / 10, f"peak {peak / 2**20:.1f} MiB"


@pytest.mark.slow  # two epochs of each model on the whole training set (about 30 s loaded)
def test_book_training_peak_memory():
    """The benchmark's memory run: the book's data (uint8) and models, float64, checkpoints
    included, in a fresh process. The whole set as float64 alone would be 345 MB."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "epoch.py"), "--memory-child", "1"],
                          check=True, capture_output=True, text=True, cwd=ROOT)
    peak_mib = float(done.stdout.strip().splitlines()[-1])
    assert peak_mib <= 300, f"peak RSS {peak_mib:.0f} MiB"
