"""Uni- vs bidirectional vanilla RNN on sequential MNIST, numpy from scratch.

    from birnn import UniRNN, BiRNN, TrainSettings, LRSchedule, train, evaluate
"""

from birnn.layers import accuracy, softmax_cross_entropy
from birnn.models import BiRNN, RNNClassifier, UniRNN, build_model, load_model
from birnn.training import (Checkpoint, DivergenceError, Evaluation, LRSchedule, TrainResult,
                            TrainSettings, evaluate, train)

__all__ = [
    "UniRNN", "BiRNN", "RNNClassifier", "build_model", "load_model",
    "softmax_cross_entropy", "accuracy",
    "train", "evaluate", "TrainSettings", "LRSchedule", "Checkpoint", "TrainResult",
    "Evaluation", "DivergenceError",
]
