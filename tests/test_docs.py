"""The documentation: the site builds strictly, and the README's commands and links hold.

``mkdocs build --strict`` fails on any warning: a broken link or anchor, a missing image, an API
reference (``::: module.name``) that griffe cannot resolve, or a generated page (config, CLI,
API, metric and module tables in ``docs/hooks.py``) whose source changed shape.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_site_builds_strictly(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(tmp_path / "site"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    site = tmp_path / "site"
    for page in ("reference/config", "reference/cli", "reference/landscape", "reference/sweeps"):
        assert (site / page / "index.html").is_file(), page
    config = (site / "reference/config/index.html").read_text()
    assert "train.lr" in config and "search.space" in config
    cli = (site / "reference/cli/index.html").read_text()
    assert "sweeps run" in cli and "--results-dir" in cli
    api = (site / "reference/landscape/index.html").read_text()
    assert "hessian_eigenvalues" in api and "HessianOperator" in api


def test_readme_test_command_is_the_one_ci_runs():
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()]
    (command,) = [line for line in ci_lines if line.endswith("python -m pytest")]
    assert command in README.read_text().splitlines(), f"README must show CI's command:\n{command}"


def test_readme_relative_links_exist():
    text = README.read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    relative = [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:|#", t)]
    assert relative, "the README links to the documentation pages"
    missing = [t for t in relative if not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"
