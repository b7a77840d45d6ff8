"""The MLflow UI in a real browser (Debian's chromium driven by Playwright) on a store holding a small sweep:
the runs table at the link `make ui` prints (no toggle), the Assistant closed and staying closed, the sweep's
parent expanding to its jobs, the Dataset, Models and best/val_loss columns filled, and a val/loss chart drawn. Screenshots go to the test's folder; with DESCENT_SCREENSHOTS=docs they
replace the README's in docs/."""

import os
import shutil
import subprocess

import pytest
from mlflow import MlflowClient

from conftest import ROOT, free_port
from descent.services import ui

CHROMIUM = "/usr/bin/chromium"
# no sandbox (root in a container), nothing fetched from the network by the browser itself
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 60_000  # the UI's first load compiles a lot of JavaScript on 2 busy cores


def chromium() -> str:
    """Debian's chromium, installed with apt when missing and we are root (the browser test needs no download)."""
    if not os.path.exists(CHROMIUM) and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
        if subprocess.run(install, env=env, capture_output=True, timeout=900).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)  # stale lists
            subprocess.run(install, env=env, capture_output=True, timeout=900)
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no {CHROMIUM}, and `apt-get install chromium` was not possible here (needs root and apt)")
    return CHROMIUM


@pytest.fixture
def mlflow_ui(small_sweep, tmp_path):
    """`mlflow ui` as `make ui` starts it (descent.services.ui), on the sweep's store and a free loopback port."""
    launch_dir, store, _ = small_sweep
    proc, url = ui.start(store, free_port(), cwd=launch_dir, log=tmp_path / "mlflow_ui.log")
    try:
        yield url
    finally:
        ui.stop(proc)


def test_sweep_in_the_mlflow_ui(small_sweep, mlflow_ui, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    shots = ROOT / "docs" if os.environ.get("DESCENT_SCREENSHOTS") == "docs" else tmp_path
    executable = chromium()
    _, store, _ = small_sweep
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("descent")
    runs = client.search_runs([exp.experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("descent.sweep") == "true"]
    children = sorted(r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id)
    assert children == ["rmsprop-mini-s0", "sgd-mini-s0"]

    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1700, "height": 760})  # wide enough for a metric column
            page.set_default_timeout(TIMEOUT_MS)
            # the link `make ui` prints opens the runs table: no GenAI page, no toggle to click
            page.goto(ui.experiment_url(mlflow_ui, exp.experiment_id))
            page.locator("[role=columnheader]").filter(has_text="Run Name").first.wait_for()
            assert not page.get_by_text("Detect Issues", exact=True).count()  # the GenAI overview's
            assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"

            # the MLflow Assistant's panel opens itself on a browser's first visit (a third of the window); its
            # close button closes it, and the browser remembers: a reload keeps it closed
            close = page.locator("[data-component-id='mlflow.assistant.chat_panel.close']")
            close.click()
            close.wait_for(state="detached")
            page.reload()
            page.locator("[role=gridcell]").filter(has_text=parent.info.run_name).first.wait_for()
            assert not close.count(), "the Assistant's panel came back after a reload"

            # the sweep's parent run expands to its two jobs
            row = page.locator("[role=row]").filter(has_text=parent.info.run_name).first
            row.locator("button[data-component-id*=runnamecellrenderer]").click()
            for name in children:
                page.locator("[role=gridcell]").filter(has_text=name).first.wait_for()

            # Dataset and Models columns: ag-grid lays the pinned name column and the others out as separate
            # rows, in the same order; the jobs' cells come after the parent's
            datasets = page.locator("[role=gridcell][col-id='attributes.`Dataset`']")
            models = page.locator("[role=gridcell][col-id='attributes.`Models`']")
            datasets.nth(2).wait_for()
            texts = [c.inner_text() for c in datasets.all()]
            assert sum("mnist (train, 2000×784)" in t for t in texts) == 2, texts
            assert sum("mnist (validation, 1000×784)" in t for t in texts) == 2, texts
            # each job's model, shown by its registered name and version (logger.register_model=mnist-mlp)
            cells = [" ".join(c.inner_text().split()) for c in models.all()]
            assert sorted(cells) == ["-", "mnist-mlp v1", "mnist-mlp v2"], cells
            # the best validation loss beside the last one: its column holds each job's best
            page.get_by_role("button", name="Columns").click()
            page.get_by_placeholder("Search columns").fill("best/val_loss")
            page.get_by_text("best/val_loss", exact=True).click()
            page.keyboard.press("Escape")
            best = page.locator("[role=gridcell][col-id='metrics.`best/val_loss`']")
            best.nth(1).wait_for()
            shown = sorted(float(c.inner_text()) for c in best.all() if c.inner_text().strip() not in ("", "-"))
            wanted = sorted(r.data.metrics["best/val_loss"] for r in runs if "best/val_loss" in r.data.metrics)
            assert shown == pytest.approx(wanted, rel=1e-3), (shown, wanted)
            page.screenshot(path=str(shots / "mlflow_runs.png"))

            # charts: val/loss against the step (= training examples seen), one line per job
            page.locator("label:has(input[value=CHART])").click()
            page.get_by_placeholder("Search metric charts").fill("val/loss")
            page.get_by_text("val/loss", exact=True).first.wait_for()
            lines = page.locator(".js-plotly-plot .scatterlayer .trace")
            lines.nth(1).wait_for()  # plotly draws a trace per run with points (each job; the parent has none)
            assert lines.count() >= 2
            page.screenshot(path=str(shots / "mlflow_val_loss.png"))
        finally:
            browser.close()
