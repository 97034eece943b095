"""The MLflow UI as a new user sees it, in a real browser: headless Chromium from Debian's
packages (/usr/bin/chromium; Playwright's own browser downloads are not used), driven by
Playwright for Python. `mlflow ui` serves a throwaway store on 127.0.0.1 and the quick
pipeline on both datasets (`dvc repro` in a copy of the project) logs into it THROUGH that
server, so the registry of a server is exercised too. Screenshots go to a temporary folder
(printed; with `-n 0 -s`, since xdist workers' output is not shown), or to $UI_SCREENSHOTS_DIR.

    make test-ui      # = python -m pytest -m ui
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.stages import compare
from pipeline_testkit import (TINY, VENV_BIN, clean_env, commit_all, copy_project, free_port,
                              http_service, run)

pytestmark = pytest.mark.ui

CHROMIUM = "/usr/bin/chromium"   # apt-get install chromium (.ci/run does)
VIEWPORT = {"width": 1440, "height": 900}   # a laptop screen
EXPERIMENT = "birnn-table-19-12"
SWEEP, SWEEP_EXPERIMENT = "ui-seeds", "birnn-sweeps"
UI_START_SECONDS = 120            # `mlflow ui` answers /health after 15-20 s on 2 idle cores
PAGE_TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """`mlflow ui` on a free port over a fresh store, filled by the quick pipeline through it."""
    started = time.monotonic()
    root = tmp_path_factory.mktemp("ui")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with http_service(
            [str(VENV_BIN / "mlflow"), "ui", "--backend-store-uri",
             f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
             "--host", "127.0.0.1", "--port", str(port)], f"{url}/health", root / "mlflow-ui.log",
            UI_START_SECONDS, cwd=root, env=clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")):
        project = copy_project(root / "project")
        params = (project / "params.yaml").read_text()
        (project / "params.yaml").write_text(params.replace("experiment: book", "experiment: quick"))
        commit_all(project, "preset quick")
        result = run(["dvc", "repro"], cwd=project, timeout=1800, MLFLOW_TRACKING_URI=url)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        # A small sweep and its report: the parent run's description then holds the verdict.
        # (In its own experiment: its parent's metrics would join the runs table's columns.)
        sweep = run(["python", "-m", "pipeline.stages.train", "-m", *TINY, "model=uni,bi",
                     "train.seed=0,1", f"hydra.sweep.dir=multirun/{SWEEP}",
                     f"tracking.experiment_name={SWEEP_EXPERIMENT}"], cwd=project,
                    timeout=600, MLFLOW_TRACKING_URI=url)
        assert sweep.returncode == 0, sweep.stderr[-3000:]
        report = run(["python", "-m", "pipeline.commands.sweep_report", f"sweep={SWEEP}"],
                     cwd=project, timeout=300, MLFLOW_TRACKING_URI=url)
        assert report.returncode == 0, report.stderr[-3000:]
        client = MlflowClient(url)
        sweeps_id = client.get_experiment_by_name(SWEEP_EXPERIMENT).experiment_id
        runs = {name: json.loads((project / "models" / "mnist" / name / "run.json").read_text())["run_id"]
                for name in ("uni", "bi")}
        # UI_SCREENSHOTS_DIR keeps them (docs/tracking.md's runs table is runs.png).
        shots = Path(os.environ.get("UI_SCREENSHOTS_DIR") or root / "screenshots")
        shots.mkdir(parents=True, exist_ok=True)
        print(f"\nscreenshots: {shots}")
        yield {"url": url, "client": client, "runs": runs, "shots": shots, "project": project,
               "report": client.get_run(runs["uni"]).data.tags["report_run_id"],
               "sweep_experiment_id": sweeps_id,
               "sweep_parent": client.search_runs(
                   [sweeps_id], f"attributes.run_name = 'sweep {SWEEP}'")[0].info.run_id,
               "experiment_id": client.get_experiment_by_name(EXPERIMENT).experiment_id}
    print(f"ui tests: {time.monotonic() - started:.0f} s in all")


@pytest.fixture(scope="module")
def browser(ui):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser):
    """A fresh page (no state from another test) at a desktop size."""
    context = browser.new_context(viewport=VIEWPORT)
    # MLflow's telemetry SharedWorker keeps the network busy forever: "networkidle" never comes.
    context.add_init_script("delete window.SharedWorker;")
    context.set_default_timeout(PAGE_TIMEOUT_MS)
    page = context.new_page()
    yield page
    context.close()


def close_assistant(page) -> None:
    """The MLflow Assistant panel opens on a first visit and takes a third of the page."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.get_by_text("MLflow Assistant").first.wait_for()
    button = page.get_by_role("button", name="Close", exact=True).first
    try:
        button.wait_for(timeout=5_000)
    except PlaywrightTimeout:
        return   # (a later MLflow may not open it)
    button.click()


def grid_cells(page, run_name: str) -> dict[str, str]:
    """The runs table's cells of the row of ``run_name``: column id -> text. (The grid
    renders a row in several containers, pinned and scrolling, tied by row-id.)"""
    return page.evaluate("""name => {
        const pinned = [...document.querySelectorAll('.ag-row')].find(row =>
            [...row.querySelectorAll("[col-id='attributes.`Run Name`'] a")]
                .some(a => a.innerText.trim() === name));
        if (!pinned) return null;
        const cells = {};
        const id = pinned.getAttribute('row-id');
        for (const row of document.querySelectorAll(`.ag-row[row-id='${id}']`))
            for (const cell of row.querySelectorAll('.ag-cell'))
                cells[cell.getAttribute('col-id')] = cell.innerText.trim();
        return cells;
    }""", run_name)


def wait_for_cells(page, run_name: str, column: str) -> dict[str, str]:
    """grid_cells of ``run_name`` once its ``column`` has a value (bounded)."""
    deadline = time.monotonic() + PAGE_TIMEOUT_MS / 1000
    while True:
        cells = grid_cells(page, run_name) or {}
        if cells.get(column):
            return cells
        assert time.monotonic() < deadline, f"no {column} for run {run_name}: {cells}"
        time.sleep(0.2)


def dismiss_tip(page) -> None:
    """MLflow's "Detect Issues" tip on its GenAI pages: a popover that takes the clicks."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.get_by_role("button", name="Got it").first.click(timeout=5_000)
    except PlaywrightTimeout:
        pass   # (not shown, or a later MLflow without it)


def add_column(page, name: str) -> None:
    """Columns -> search -> tick ``name``, as a user adds a metric or param column."""
    page.get_by_role("button", name="Columns").first.click()
    page.get_by_placeholder("Search columns").fill(name)
    page.get_by_role("dialog").get_by_text(name, exact=True).first.click()
    page.keyboard.press("Escape")


def load_description_images(page) -> int:
    """Scroll to each figure of a run's description (Markdown images load lazily, as a reader
    scrolls), wait until all have rendered, and count them."""
    images = page.locator("img[src^='get-artifact']")
    for index in range(images.count()):
        images.nth(index).scroll_into_view_if_needed()
    page.wait_for_function("""() => [...document.querySelectorAll("img[src^='get-artifact']")]
        .every(img => img.complete && img.naturalWidth > 0)""")
    return images.count()


def assert_about_panel_in_window(page, run_id: str) -> None:
    """A run page's figures leave its About panel in the window: the run id shown there is
    whole (a wide description image pushes the panel off the right edge)."""
    about = page.get_by_text("About this run").first.bounding_box()
    shown = page.get_by_text(run_id, exact=True)
    boxes = [shown.nth(i).bounding_box() for i in range(shown.count())]
    in_panel = [box for box in boxes if box and box["x"] > about["x"] - 1]
    assert in_panel, f"run id {run_id} not in the About panel (at x={about['x']:.0f}): {boxes}"
    assert all(box["x"] + box["width"] <= VIEWPORT["width"] for box in in_panel), in_panel


def test_the_front_door_lands_on_the_training_runs(ui, page):
    # Where a user starts: the UI's home page, then Experiments -> the experiment. MLflow
    # 3.17 opens experiments on its GenAI pages until the browser's Model training switch is
    # set; the experiment's description says so on the page it lands on.
    client = ui["client"]
    page.goto(f"{ui['url']}/", wait_until="networkidle")
    close_assistant(page)
    # (The list's link; a stale breadcrumb may also be named after the experiment.)
    experiment_link = page.locator(f"a[href='#/experiments/{ui['experiment_id']}']",
                                   has_text=EXPERIMENT).first
    page.get_by_role("link", name="Experiments").first.click()
    experiment_link.click()
    page.get_by_text("Switch the toggle at the top left").first.wait_for()  # its first line
    dismiss_tip(page)
    page.get_by_text("Model training", exact=True).first.click()   # opens the runs
    page.get_by_role("heading", name="Runs", exact=True).wait_for()
    # ... and the browser remembers it: from the Experiments list again, the runs.
    page.get_by_role("link", name="Experiments").first.click()
    page.wait_for_function("location.hash.split('?')[0] === '#/experiments'")
    experiment_link.click()
    page.get_by_role("heading", name="Runs", exact=True).wait_for()   # not the GenAI pages
    assert page.get_by_text("Detect Issues").count() == 0
    # The pipeline's training runs at the top level, named for model, dataset and seed, with
    # their data and registered model: nothing to unfold.
    for name in ("uni", "bi"):
        cells = wait_for_cells(page, f"{name}-mnist-seed0", "attributes.`Models`")
        assert cells["attributes.`Models`"].split() == [f"birnn-mnist-{name}", "v1"], cells
        assert cells["attributes.`Dataset`"].startswith("mnist-train"), cells
    for column in ("param_count", "test_acc_best"):
        add_column(page, column)
    for name in ("uni", "bi"):
        run_ = client.get_run(ui["runs"][name])
        cells = wait_for_cells(page, f"{name}-mnist-seed0", "metrics.`test_acc_best`")
        assert cells["params.`param_count`"] == run_.data.params["param_count"], cells
        assert float(cells["metrics.`test_acc_best`"]) == pytest.approx(
            run_.data.metrics["test_acc_best"], abs=1e-4), cells
    page.screenshot(path=ui["shots"] / "runs.png")
    # `make ui`'s link lands there too.
    page.goto(compare.runs_page_url(client, EXPERIMENT, base=ui["url"]), wait_until="networkidle")
    page.get_by_role("heading", name="Runs", exact=True).wait_for()
    wait_for_cells(page, "bi-mnist-seed0", "attributes.`Models`")


def test_compare_page_shows_both_parameter_counts(ui, page):
    page.goto(compare.runs_page_url(ui["client"], EXPERIMENT, base=ui["url"]),
              wait_until="networkidle")
    close_assistant(page)
    for name in ("uni-mnist-seed0", "bi-mnist-seed0"):   # tick the two runs, as a user does
        page.locator(".ag-row a", has_text=name).first.wait_for()
        row_id = page.evaluate("""name => [...document.querySelectorAll('.ag-row')].find(row =>
            [...row.querySelectorAll('a')].some(a => a.innerText.trim() === name))
            .getAttribute('row-id')""", name)
        page.locator(f".ag-row[row-id='{row_id}'] input[type=checkbox]").first.check()
    page.get_by_role("button", name="Compare").first.click()
    page.wait_for_url("**/compare-runs**")
    page.get_by_text("Comparing 2 Runs").wait_for()
    close_assistant(page)
    row = page.locator("tr", has=page.get_by_text("param_count", exact=True)).first
    row.wait_for()
    assert "2282" in row.inner_text() and "2170" in row.inner_text()
    row.scroll_into_view_if_needed()
    page.screenshot(path=ui["shots"] / "compare.png")


def test_registered_version_page_shows_its_test_results_and_run(ui, page):
    page.goto(f"{ui['url']}/#/models/birnn-mnist-bi/versions/1", wait_until="networkidle")
    close_assistant(page)
    accuracy = ui["client"].get_run(ui["runs"]["bi"]).data.metrics["test_acc_best"]
    page.get_by_text(f"Test accuracy {100 * accuracy:.2f}% with the best parameters").first.wait_for()
    page.get_by_role("link", name="bi-mnist-seed0").first.wait_for()   # Source Run
    page.screenshot(path=ui["shots"] / "version.png")


def test_report_run_page_shows_table_19_12_with_its_figures(ui, page):
    base = f"{ui['url']}/#/experiments/{ui['experiment_id']}/runs/{ui['report']}"
    page.goto(f"{base}?workflowType=machine_learning", wait_until="networkidle")
    close_assistant(page)
    page.get_by_text("Show more").first.click()
    table = page.locator("table", has=page.get_by_text("test accuracy, best parameters"))
    table.wait_for()
    text = table.inner_text()
    for name in ("uni", "bi"):
        accuracy = ui["client"].get_run(ui["runs"][name]).data.metrics["test_acc_best"]
        assert f"{100 * accuracy:.2f}%" in text
    assert "95.17%" in text and "2281" in text   # the book's column
    assert load_description_images(page) == 2
    table.scroll_into_view_if_needed()
    assert_about_panel_in_window(page, ui["report"])
    page.screenshot(path=ui["shots"] / "report.png")


def test_sweep_parent_page_shows_its_verdict_and_per_seed_figure(ui, page):
    base = f"{ui['url']}/#/experiments/{ui['sweep_experiment_id']}/runs/{ui['sweep_parent']}"
    page.goto(f"{base}?workflowType=machine_learning", wait_until="load")
    close_assistant(page)
    page.get_by_text(f"Sweep {SWEEP}", exact=False).first.wait_for()
    show_more = page.get_by_text("Show more").first
    if show_more.count():
        show_more.click()
    result = page.get_by_text("mean test accuracy (best parameters)").first
    result.wait_for()
    text = result.inner_text()
    assert "bi minus uni" in text and "interval" in text and "seeds" in text
    assert load_description_images(page) == 1   # the per-seed figure
    assert_about_panel_in_window(page, ui["sweep_parent"])
    page.screenshot(path=ui["shots"] / "sweep-parent.png")


def test_training_run_page_says_what_was_trained_and_how_it_scored(ui, page):
    run_id = ui["runs"]["bi"]
    page.goto(f"{ui['url']}/#/experiments/{ui['experiment_id']}/runs/{run_id}"
              "?workflowType=machine_learning", wait_until="networkidle")
    close_assistant(page)
    page.get_by_text("bidirectional vanilla RNN, two chains of 20 + 20").first.wait_for()
    page.get_by_text("Metrics (14)").wait_for()   # not 37
    page.get_by_text("mnist-train").first.wait_for()   # the data it used
    page.screenshot(path=ui["shots"] / "run.png")
    # the server's registry holds the pipeline's versions, aliased by preset
    version = ui["client"].get_model_version_by_alias("birnn-mnist-bi", "quick")
    assert version.run_id == run_id


def test_dvc_plots_show_renders_exactly_the_declared_plots_offline(ui, browser):
    project = ui["project"]
    out = ui["shots"] / "dvc_plots"
    result = run(["dvc", "plots", "show", "-o", str(out)], cwd=project, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    html = (out / "index.html").read_text()
    declared = [next(iter(plot)) for plot in yaml.safe_load((project / "dvc.yaml").read_text())["plots"]]
    assert re.findall(r'<div id = "([^"]+)"', html) == declared  # none drawn on its own
    assert not re.search(r"<script[^>]+src=", html)  # Vega inline (.dvc/plots/offline.html)

    context = browser.new_context(offline=True, viewport=VIEWPORT)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(out.joinpath("index.html").as_uri())
    page.wait_for_function(f"document.querySelectorAll('.vega-embed canvas').length == {len(declared)}",
                           timeout=PAGE_TIMEOUT_MS)
    page.screenshot(path=str(ui["shots"] / "dvc-plots.png"))
    context.close()
    assert errors == []

