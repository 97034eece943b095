"""Uni- vs bidirectional vanilla RNN on sequential MNIST, numpy from scratch.

    from birnn import UniRNN, BiRNN, TrainSettings, LRSchedule, train, evaluate

Importing birnn before numpy pins numpy's and OpenBLAS's kernels to their AVX2 code, so that
training gives the same bytes on every x86-64 machine (birnn.numerics).
"""

from birnn.numerics import pin_environment

pin_environment()  # before anything below loads numpy

from birnn.layers import accuracy, softmax_cross_entropy  # noqa: E402
from birnn.models import BiRNN, RNNClassifier, UniRNN, build_model, load_model  # noqa: E402
from birnn.training import (Checkpoint, DivergenceError, Evaluation, LRSchedule,  # noqa: E402
                            TrainResult, TrainSettings, evaluate, train)

__all__ = [
    "UniRNN", "BiRNN", "RNNClassifier", "build_model", "load_model",
    "softmax_cross_entropy", "accuracy",
    "train", "evaluate", "TrainSettings", "LRSchedule", "Checkpoint", "TrainResult",
    "Evaluation", "DivergenceError",
]
