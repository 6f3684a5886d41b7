"""The MLflow side of a sweep as a user meets it: quiet output against a tracking server, the links
the CLI prints, and the MLflow UI in a real browser.

One module-wide set-up (a real ``mlflow server`` on PostgreSQL, a 2-CPU Ray, one 4-trial sweep run
with ``sweeps run --quiet`` against the server); the browser is Debian's headless Chromium driven by
Selenium through chromium-driver (``.ci/run`` installs both; never a downloaded browser). Each page
visited is saved as a screenshot in the test's tmp folder.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import ray
import yaml
from _cluster import MlflowServer, Postgres
from mlflow import MlflowClient

from sweeps.cli import main
from sweeps.service.tracking import EXPERIMENT_KIND

NAME = "ui-sweep"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1600,1000",
)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """``(server, stdout, stderr, exit code)`` of `sweeps run --quiet` of a 4-trial sweep against a
    real ``mlflow server`` (PostgreSQL backend, proxied artifacts)."""
    Postgres.require()
    pg = Postgres()
    tmp = tmp_path_factory.mktemp("mlflow-ui")
    server = MlflowServer(pg.create("ui"), tmp / "artifacts", tmp)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20)
    try:
        server.start()
        config = tmp / "sweep.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "name": NAME,
                    "dataset": {"name": "digits", "train_size": 256},
                    "model": {"name": "mlp", "width": 8, "depth": 1},
                    "train": {"lr": 0.1, "batch_size": 32, "max_epochs": 3, "stop": {}},
                    "measure": ["hessian_top_eig"],
                    "measure_subset": 64,
                    "search": {
                        "sampler": "grid",
                        "space": {"train.lr": {"values": [0.05, 0.2]}, "seed": {"values": [0, 1]}},
                    },
                }
            )
        )
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(
                [
                    "run",
                    str(config),
                    "--tracking-uri",
                    server.url,
                    "--results-dir",
                    str(tmp / "results"),
                    "--address",
                    ray.get_runtime_context().gcs_address,
                    "--quiet",
                    "--no-report",
                ]
            )
        yield server, out.getvalue(), err.getvalue(), code
    finally:
        ray.shutdown()
        server.stop()
        pg.drop_all()


def test_quiet_against_a_tracking_server_prints_no_mlflow_run_links(swept):
    _, out, err, code = swept
    assert code == 0, err
    for text in (out, err):
        assert "View run" not in text and "View experiment" not in text and "🏃" not in text, text
    assert out.count("\n") == 1 and out.startswith(f"sweep {NAME}: 4/4 trials finished")


def test_the_printed_links_open_the_runs_table_and_the_parent_run(swept):
    server, _, err, _ = swept
    client = MlflowClient(server.url)
    experiment = client.get_experiment_by_name(NAME)
    assert experiment.tags.get(EXPERIMENT_KIND[0]) == EXPERIMENT_KIND[1]
    parent = next(r for r in client.search_runs([experiment.experiment_id]) if r.data.tags["sweeps.role"] == "parent")
    base = f"{server.url}/#/experiments/{experiment.experiment_id}/runs"
    view = "?workflowType=machine_learning"
    assert f"mlflow: runs {base}{view} ; parent run {base}/{parent.info.run_id}{view}" in err


def _browser(tmp: Path):
    """Headless Chromium (Debian's package) through Selenium; skipped outside CI when absent."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        reason = f"no browser: {CHROMIUM} / {CHROMEDRIVER} missing (apt-get install -y chromium chromium-driver)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + "; .ci/run installs them", pytrace=False)
        pytest.skip(reason)
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-', dir=tmp)}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _wait_text(driver, pattern: str, timeout: float = 60) -> str:
    """The page's visible text once it matches ``pattern`` (regex); ``AssertionError`` otherwise."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(driver, timeout, poll_frequency=0.5).until(
            lambda d: re.search(pattern, d.find_element("tag name", "body").text)
        )
    except TimeoutException:
        raise AssertionError(
            f"{pattern!r} not on {driver.current_url}:\n{driver.find_element('tag name', 'body').text[:3000]}"
        ) from None
    return driver.find_element("tag name", "body").text


def test_the_mlflow_ui_shows_the_sweep_in_a_real_browser(swept, tmp_path):
    server, _, err, code = swept
    assert code == 0, err
    runs_link, parent_link = re.search(r"mlflow: runs (\S+) ; parent run (\S+)", err).groups()
    parent_id = parent_link.split("/runs/")[1].split("?")[0]
    client = MlflowClient(server.url)
    experiment = client.get_experiment_by_name(NAME).experiment_id
    trial = next(r for r in client.search_runs([experiment]) if r.data.tags.get("optuna.trial_number") == "0")
    driver = _browser(tmp_path)
    try:
        # the runs table in the Model training view (not the GenAI traces overview); trials under the parent
        driver.get(runs_link)
        text = _wait_text(driver, r"\b5 matching runs")  # the parent and its 4 trials
        driver.save_screenshot(str(tmp_path / "1-runs-table.png"))
        assert "Model registry" in text and "Observability" not in text and NAME in text
        _wait_element(driver, "button[data-component-id*='runnamecellrenderer']").click()  # the parent's "+"
        text = _wait_text(driver, f"{NAME}-0003")
        driver.save_screenshot(str(tmp_path / "2-runs-table-expanded.png"))
        assert all(f"{NAME}-{n:04d}" in text for n in range(4))

        # the parent run's page: its live tau metrics and its trials, then its live/ figures
        driver.get(parent_link)
        text = _wait_text(driver, r"live\.tau\.hessian_top_eig")
        metric = driver.find_element("xpath", "//*[normalize-space(text())='live.tau.hessian_top_eig']")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", metric)
        driver.save_screenshot(str(tmp_path / "3-parent-run.png"))
        assert "live.n_models" in text and "Child runs" in text
        driver.get(parent_link.replace("?", "/artifacts?"))
        _wait_text(driver, "config.yaml")
        _click_text(driver, "live")
        _wait_text(driver, r"hessian_top_eig\.png")
        _click_text(driver, "hessian_top_eig.png")
        time.sleep(2)  # the image preview
        driver.save_screenshot(str(tmp_path / "4-parent-artifacts.png"))

        # a trial's artifacts
        driver.get(parent_link.replace(parent_id, f"{trial.info.run_id}/artifacts"))
        text = _wait_text(driver, r"model\.pt")
        assert "training.png" in text
        _click_text(driver, "training.png")
        time.sleep(2)
        driver.save_screenshot(str(tmp_path / "5-trial-artifacts.png"))
    finally:
        driver.quit()
        if os.environ.get("SWEEPS_KEEP_SCREENSHOTS"):
            shutil.copytree(tmp_path, os.environ["SWEEPS_KEEP_SCREENSHOTS"], dirs_exist_ok=True)


def _wait_element(driver, css: str, timeout: float = 60):
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.5).until(
        expected_conditions.element_to_be_clickable(("css selector", css))
    )


def _click_text(driver, text: str) -> None:
    """Click the innermost visible element whose own text is ``text``."""
    elements = driver.find_elements("xpath", f"//*[normalize-space(text())='{text}']")
    visible = [e for e in elements if e.is_displayed()]
    assert visible, f"nothing reads {text!r} on {driver.current_url}"
    visible[-1].click()
