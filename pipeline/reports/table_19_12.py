"""Table 19-12 next to ours: the table (pandas), its Markdown page and the notes on the book's
numbers. Ours come from the runs; the book's from data/book/table_19_12.yaml, with its source.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable, Mapping

import pandas as pd
from omegaconf import OmegaConf

from pipeline.metric_names import RULE_TEXT, RULES
from pipeline.reports import formatting



def load_book(path: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path))


def build_table(book: dict, ours: Mapping[str, dict]) -> pd.DataFrame:
    """Rows: parameter count, then accuracy and loss on the test set with the best and with
    the last parameters. Columns: book_<model> for the book, ours_<model> for ours.

    ``ours[name]`` is metrics/<dataset>/test.json's entry: {"param_count", "best": {"loss",
    "accuracy"}, "last": {...}}. Accuracies are fractions; the Markdown shows percent.
    """
    rows = [{"quantity": "parameter count", "rule": "",
             **{f"book_{n}": book["param_count"].get(n) for n in ours},
             **{f"ours_{n}": ours[n]["param_count"] for n in ours}}]
    for rule in RULES:
        for quantity, key in (("test accuracy", "accuracy"), ("test loss", "loss")):
            rows.append({"quantity": quantity, "rule": RULE_TEXT[rule],
                         **{f"book_{n}": book["test"].get(n, {}).get(rule, {}).get(key)
                            for n in ours},
                         **{f"ours_{n}": ours[n][rule][key] for n in ours}})
    return pd.DataFrame(rows, dtype=object)  # object: counts stay integers in the CSV


def _cell(quantity: str, value) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "–"
    if quantity == "parameter count":
        return f"{int(value)}"
    if quantity == "test accuracy":
        return formatting.percent(value)
    return formatting.loss(value, digits=6)


def table_markdown(table: pd.DataFrame) -> str:
    shown = pd.DataFrame({
        "": [f"{q}, {r}" if r else q for q, r in zip(table["quantity"], table["rule"])],
        **{column.replace("_", " "): [_cell(q, v) for q, v in zip(table["quantity"], table[column])]
           for column in table.columns if column.startswith(("book_", "ours_"))},
    })
    return shown.to_markdown(index=False, colalign=["left"] + ["right"] * (shown.shape[1] - 1))


def subset_sums(counts: Mapping[str, int]) -> set[int]:
    values = list(counts.values())
    return {sum(c) for r in range(len(values) + 1) for c in itertools.combinations(values, r)}


def notes(book: dict, tensor_counts: Mapping[str, Mapping[str, int]], merge: str | None) -> str:
    """The book's inconsistencies, with our side of each taken from the runs."""
    lines = []
    for name in ("uni", "bi"):
        if name not in tensor_counts:
            continue
        counts = tensor_counts[name]
        total = sum(counts.values())
        parts = " + ".join(f"{tensor} {n}" for tensor, n in counts.items())
        claim = book["param_count"][name]
        lines.append(f"- **Parameter count, {name}.** The table says {claim}; the model as coded "
                     f"has {parts} = {total}, {total - claim:+d} from the table.")
        if claim not in subset_sums(counts):
            lines.append(f"  No subset of these tensors sums to {claim}: leaving out some "
                         f"tensors (the biases, say) does not explain it either.")
    printed, test = book["table_as_printed"], book["test"]
    lines += [
        "- **The table mixes rules and truncates.** For uni it quotes the test with the best "
        f"parameters ({printed['uni']['accuracy']}, loss {test['uni']['best']['loss']} shown as "
        f"{printed['uni']['loss']}); for bi, the accuracy {printed['bi']['accuracy']} is the same "
        f"under both rules, but the loss {printed['bi']['loss']} is the last-parameter test "
        f"({test['bi']['last']['loss']}; the best parameters gave {test['bi']['best']['loss']}). "
        f"Losses are cut to three decimals, not rounded ({test['uni']['best']['loss']} -> "
        f"{printed['uni']['loss']}). The table above "
        "quotes the full logged values under each rule instead.",
        f"- **A number in no log.** Under the bi log the text says the best parameters gave "
        f"{100 * book['text_claim_bi']['best']['accuracy']:.2f}% and loss "
        f"{book['text_claim_bi']['best']['loss']}; the log just above prints "
        f"{100 * test['bi']['best']['accuracy']:.2f}% and {test['bi']['best']['loss']}.",
        "- **Concatenate or sum.** The text says the final states s1 and s2 are concatenated "
        "(拼接); formula 5 and the code sum them, and the sum is what produced the numbers"
        + (f". Ours: merge = {merge}." if merge else "."),
        "- **One unseeded run each.** The book's code does not seed its random generator. Single "
        "runs with different seeds spread over one to two points of accuracy (the book's code "
        "rerun with three seeds; our multi-seed sweeps, `reports/sweeps/`), so differences of "
        "that size between the columns are noise.",
    ]
    return "\n".join(lines)


FIGURES = {"validation_curves.png": "Validation loss and accuracy during training",
           "confusion_matrices.png": "Confusion matrices on the test set, best parameters"}


def models_line(models: Mapping[str, tuple[str, int, str | None]], ids: bool) -> str:
    """'The models: `models:/birnn-mnist-uni@book`, ...' for the registered models
    (``models[name]`` = (registered name, version or None if not in this store, alias or
    None)), with '(version 3)' if ``ids``; empty if there are none."""
    shown = [f"`models:/{registered}@{alias}`" if alias else f"`models:/{registered}/{version}`"
             for registered, version, alias in models.values()]
    if not shown:
        return ""
    listed = ", ".join(f"{uri} (version {version})" if ids and version is not None
                       else f"{uri} (not in this store)" if ids else uri
                       for uri, (_, version, _) in zip(shown, models.values()))
    return (f"\nThe models, registered in MLflow: {listed}; load one with "
            "`mlflow.pyfunc.load_model(<uri>)` or serve it with `mlflow models serve -m <uri>`.\n")


def page(table: pd.DataFrame, book: dict, context: dict, notes_text: str,
         figure_link: Callable[[str], str] = str, ids: bool = False) -> str:
    """The whole reports/table_19_12/<dataset>/report.md. ``figure_link``: where a figure (its file
    name) is linked from: beside the page by default; the report run's description links
    its artifacts. ``ids``: name the run ids, training times and model versions, which change
    on every rerun (the run's description has them; the committed page does not, so a rerun
    with the same numbers leaves it unchanged)."""
    if ids:
        runs = ", ".join(f"{name} `{run_id}`" for name, run_id in context["runs"].items())
        where = f"runs {runs};\nthis report's run `{context['report_run']}`"
        checkpoints = context["best_checkpoints_timed"]
    else:
        where = f"the runs that the report run `{context['report_name']}` links"
        checkpoints = context["best_checkpoints"]
    figures = "\n\n".join(f"![{alt}]({figure_link(name)})" for name, alt in FIGURES.items())
    warnings = formatting.reference_warnings([context["preset"]], context["dataset"])
    dataset = formatting.dataset_title(context["dataset"])
    return f"""# Table 19-12 reproduced: unidirectional vs bidirectional RNN on sequential {dataset}

Generated by `python -m pipeline.stages.compare` from the tracked runs; do not edit by hand.
{warnings}
{table_markdown(table)}

*Book*: {book['source']} (file `data/book/table_19_12.yaml`).
*Ours*: `metrics/{context['dataset']}/test.json`, written by the evaluate stage; the same values are the runs'
`test_acc_*` / `test_loss_*` metrics in MLflow (experiment `{context['experiment']}`, {where}).
Preset `{context['preset']}`: {context['training']}.
Best parameters: those with the lowest validation loss over all checkpoints; last parameters:
those after the final update. {checkpoints}
A CSV with full precision is in `table.csv`.
{models_line(context.get('models', {}), ids)}
{figures}

## Notes on the book's numbers

{notes_text}
"""
