"""Mini-batch SGD training with the book's checkpoint and best-model rules, and evaluation.

What the book's code does, and so what this does:
- plain SGD, batch 128, the last partial batch averaged over its own length;
- the training set reshuffled at the start of every epoch;
- a learning rate constant or stepped by (0-based) epoch;
- a checkpoint every fraction of an epoch (0.5: every 215 of the 430 iterations): the
  whole validation set is evaluated, and the parameters with the lowest validation loss
  so far (strict <) are kept as "best"; the parameters after the last update are "last".

Images may be given as uint8 pixels: the training set then stays uint8 and each batch is
scaled to [0, 1] (``birnn.data.scale_pixels``, x / 255) as it is used. Division is
elementwise, so that is bit for bit the same as scaling the whole set first, in an eighth
of the memory (55,000 MNIST images: 43 MB instead of 345 MB as float64).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
from threadpoolctl import threadpool_limits

from birnn.data import scale_pixels
from birnn.layers import accuracy, softmax_cross_entropy
from birnn.models import RNNClassifier


class DivergenceError(RuntimeError):
    """The loss or a parameter stopped being finite, or the loss passed ``TrainSettings.max_loss``."""


@dataclass(frozen=True)
class LRSchedule:
    """Learning rate by 0-based epoch: ``base_lr`` until the first milestone, then each
    milestone's rate from its epoch on. The book's bidirectional schedule is
    ``LRSchedule(0.01, {30: 0.008, 50: 0.005, 70: 0.002})``."""

    base_lr: float
    milestones: dict[int, float] = field(default_factory=dict)

    def __post_init__(self):
        rates = [self.base_lr, *self.milestones.values()]
        if not all(math.isfinite(r) and r > 0 for r in rates):
            raise ValueError(f"learning rates must be positive and finite, got {rates}")
        if any(int(e) != e or e < 0 for e in self.milestones):
            raise ValueError(f"milestone epochs must be non-negative integers, got {list(self.milestones)}")

    def at(self, epoch: int) -> float:
        lr = self.base_lr
        for start in sorted(self.milestones):
            if epoch >= start:
                lr = self.milestones[start]
        return lr


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 100
    batch_size: int = 128
    lr: LRSchedule | float = 0.005
    checkpoint_every: float = 0.5     # in epochs
    seed: int = 0                     # shuffling order; the model's init has its own seed
    # A tanh RNN's loss can grow huge without ever overflowing; past this it has diverged.
    # (Chance level is ln(10) = 2.3; the book's runs never exceed 2.5.) None: only non-finite.
    max_loss: float | None = 1000.0

    def __post_init__(self):
        if isinstance(self.lr, (int, float)):
            object.__setattr__(self, "lr", LRSchedule(float(self.lr)))
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.max_loss is not None and not self.max_loss > 0:
            raise ValueError(f"max_loss must be positive or None, got {self.max_loss}")
        if not 0 < self.checkpoint_every <= self.epochs:
            raise ValueError(f"checkpoint_every must be in (0, epochs], got {self.checkpoint_every}")


@dataclass(frozen=True)
class Checkpoint:
    """One evaluation during training. ``epoch`` and ``iteration`` are 0-based, as the book's log;
    ``iteration`` counts updates over the whole run (the MLflow step)."""

    epoch: int
    iteration: int
    lr: float
    train_loss: float        # of the training batch just used
    train_acc: float
    val_loss: float          # of the whole validation set
    val_acc: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    best_params: dict[str, np.ndarray]
    last_params: dict[str, np.ndarray]
    best: Checkpoint
    history: list[Checkpoint]
    seconds: float


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    per_class_accuracy: np.ndarray   # (C,)
    confusion: np.ndarray            # (C, C) int, rows true class, columns predicted
    predictions: np.ndarray          # (N,)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress_line(c: Checkpoint, epochs: int, total_iterations: int, elapsed: float) -> str:
    """The book's fields ("epoch:iteration:lr loss=<val loss>, acc=<val acc>": 0-based
    indices, as everywhere else: histories, metrics, reports), then how much of the run is
    done (a count of iterations, not a second index) and an estimate of the time left."""
    done = c.iteration + 1
    left = elapsed / done * (total_iterations - done)
    return (f"{c.epoch}:{c.iteration}:{c.lr:.6f} loss={c.val_loss:.6f}, acc={c.val_acc:.6f} "
            f"(train batch loss={c.train_loss:.6f}, acc={c.train_acc:.6f}) | "
            f"{done:,} of {total_iterations:,} iterations done ({done / total_iterations:.0%}"
            f" of {epochs} epochs), {_duration(elapsed)} elapsed, about {_duration(left)} left")


def train(model: RNNClassifier, train_x: np.ndarray, train_y: np.ndarray,
          val_x: np.ndarray, val_y: np.ndarray, settings: TrainSettings,
          on_checkpoint: Callable[[Checkpoint], None] | None = None,
          log: Callable[[str], None] | None = print) -> TrainResult:
    """Train ``model`` in place.

    train_x: (N, T, D) uint8 pixels 0..255, scaled one batch at a time, or floats used as
    they are; train_y: (N,) integer labels; likewise val_x (scaled once, if pixels), val_y.
    ``on_checkpoint`` receives every checkpoint as it is made; ``log`` every progress line.
    Raises DivergenceError when the loss or a parameter stops being finite, or the loss
    exceeds ``settings.max_loss``. There is always at least one checkpoint, since
    ``checkpoint_every`` <= ``epochs``.
    """
    n = len(train_x)
    if n == 0 or len(val_x) == 0:
        raise ValueError("training and validation sets must not be empty")
    train_x = _check_inputs(train_x, "train_x")
    val_x = model_inputs(val_x, model.dtype, "val_x")    # 5,000 images: scaled once
    batches_per_epoch = math.ceil(n / settings.batch_size)
    checkpoint_interval = max(1, int(batches_per_epoch * settings.checkpoint_every))
    shuffle_rng = np.random.default_rng(settings.seed)
    params = model.params
    history: list[Checkpoint] = []
    best: Checkpoint | None = None
    best_params: dict[str, np.ndarray] = {}
    iteration = 0
    start = time.perf_counter()

    # Two OpenBLAS threads make this workload of small matmuls ~4x slower; one is also
    # what makes results bit-identical across runs.
    with threadpool_limits(limits=1, user_api="blas"):
        for epoch in range(settings.epochs):
            lr = settings.lr.at(epoch)
            order = shuffle_rng.permutation(n)
            for first in range(0, n, settings.batch_size):
                batch = order[first:first + settings.batch_size]
                xb, yb = model_inputs(train_x[batch], model.dtype), train_y[batch]
                logits, cache = model.forward(xb)
                loss, dlogits = softmax_cross_entropy(logits, yb)
                if not math.isfinite(loss) or (settings.max_loss is not None and loss > settings.max_loss):
                    raise DivergenceError(f"training loss became {loss:.6g} at epoch {epoch}, iteration {iteration} "
                                          f"(lr {lr}): the run diverged; lower the learning rate")
                grads = model.backward(cache, dlogits)
                for name, grad in grads.items():
                    grad *= lr
                    params[name] -= grad

                if (iteration + 1) % checkpoint_interval == 0:
                    _check_finite(params, epoch, iteration, lr)
                    val_loss, val_acc = _loss_and_accuracy(model, val_x, val_y)
                    checkpoint = Checkpoint(epoch, iteration, lr, loss, accuracy(logits, yb),
                                            val_loss, val_acc)
                    history.append(checkpoint)
                    if best is None or checkpoint.val_loss < best.val_loss:
                        best = checkpoint
                        best_params = {k: v.copy() for k, v in params.items()}
                    if log:
                        log(progress_line(checkpoint, settings.epochs,
                                          settings.epochs * batches_per_epoch,
                                          time.perf_counter() - start))
                    if on_checkpoint:
                        on_checkpoint(checkpoint)
                iteration += 1
        _check_finite(params, settings.epochs - 1, iteration - 1, lr)

    seconds = time.perf_counter() - start
    if log:
        log(f"trained {settings.epochs} epochs ({iteration} iterations) in {seconds:.1f} s; "
            f"best validation loss {best.val_loss:.6f} at epoch {best.epoch}, iteration {best.iteration}")
    return TrainResult(best_params=best_params, last_params={k: v.copy() for k, v in params.items()},
                       best=best, history=history, seconds=seconds)


def evaluate(model: RNNClassifier, x: np.ndarray, y: np.ndarray) -> Evaluation:
    """Loss, accuracy, per-class accuracy and confusion matrix of ``model`` on x: (N, T, D)
    (uint8 pixels or floats, as ``train``), y: (N,)."""
    num_classes = model.config["num_classes"]
    x = model_inputs(x, model.dtype)
    with threadpool_limits(limits=1, user_api="blas"):
        logits = model.predict_logits(x)
    loss, _ = softmax_cross_entropy(logits, y)
    predictions = logits.argmax(axis=1)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (y, predictions), 1)
    per_class_total = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(per_class_total > 0, confusion.diagonal() / per_class_total, np.nan)
    return Evaluation(loss=loss, accuracy=float(np.mean(predictions == y)),
                      per_class_accuracy=per_class, confusion=confusion, predictions=predictions)


def model_inputs(x: np.ndarray, dtype: np.dtype, name: str = "x") -> np.ndarray:
    """x: (N, T, D) uint8 pixels -> scaled to [0, 1] in ``dtype``; floats -> cast to ``dtype``."""
    x = _check_inputs(x, name)
    return scale_pixels(x, dtype) if x.dtype == np.uint8 else np.asarray(x, dtype=dtype)


def _check_inputs(x: np.ndarray, name: str) -> np.ndarray:
    # Other integer arrays are ambiguous (pixels of another range? already features?):
    # refused rather than silently fed to the model unscaled.
    x = np.asarray(x)
    if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} must be uint8 pixels or floats, got dtype {x.dtype}")
    return x


def _loss_and_accuracy(model: RNNClassifier, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    logits = model.predict_logits(x)
    loss, _ = softmax_cross_entropy(logits, y)
    return loss, accuracy(logits, y)


def _check_finite(params: dict[str, np.ndarray], epoch: int, iteration: int, lr: float) -> None:
    for name, value in params.items():
        if not np.isfinite(value).all():
            raise DivergenceError(f"parameter {name} became non-finite at epoch {epoch}, iteration {iteration} "
                                  f"(lr {lr}): lower the learning rate")
