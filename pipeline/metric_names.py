"""The names that stages, sweeps and reports agree on: the two parameter rules and the
metrics a training run records."""

from __future__ import annotations

# best: the parameters with the lowest validation loss; last: those after the final update.
RULES = ("best", "last")
RULE_TEXT = {"best": "best parameters", "last": "last parameters"}

# Logged at every checkpoint of a training run; the step is the global iteration. batch_*:
# the loss and accuracy of the training batch just used (one batch, not the epoch).
CHECKPOINT_METRICS = ("val_loss", "val_acc", "batch_loss", "batch_acc", "lr")
# birnn's Checkpoint field -> the history CSV column and metric name, where they differ.
CHECKPOINT_RENAMES = {"train_loss": "batch_loss", "train_acc": "batch_acc"}

# A training run's summary, logged at step 0 (and written to metrics/<dataset>/train_<name>.json).
SUMMARY_METRICS = ("best_val_loss", "best_val_acc", "best_epoch", "best_iteration",
                   "train_seconds")


def test_metric(quantity: str, rule: str) -> str:
    """'test_acc_best', 'test_loss_last', ...: ``quantity`` is 'acc' or 'loss'."""
    return f"test_{quantity}_{rule}"


TEST_METRICS = tuple(test_metric(quantity, rule) for rule in RULES for quantity in ("acc", "loss"))

# Per-class test accuracy: a table artifact of the training run (one row per class and rule).
PER_CLASS_TABLE = "evaluation/per_class_accuracy.json"
