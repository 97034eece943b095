"""The names that stages, sweeps and reports agree on: the two parameter rules and the
metrics a training run records."""

from __future__ import annotations

# best: the parameters with the lowest validation loss; last: those after the final update.
RULES = ("best", "last")
RULE_TEXT = {"best": "best parameters", "last": "last parameters"}

# Logged at every checkpoint of a training run; the step is the global iteration.
CHECKPOINT_METRICS = ("val_loss", "val_acc", "train_loss", "train_acc", "lr")


def test_metric(quantity: str, rule: str) -> str:
    """'test_acc_best', 'test_loss_last', ...: ``quantity`` is 'acc' or 'loss'."""
    return f"test_{quantity}_{rule}"


TEST_METRICS = tuple(test_metric(quantity, rule) for rule in RULES for quantity in ("acc", "loss"))
