"""docs/study/: the committed study is the grid examples/study.yaml describes, its tables are what
sweeps.analysis computes from the committed results.csv, and the page quotes those tables.

Ground truth here is the committed ``docs/study/results.csv`` (the run of ``examples/study.yaml``):
every statistic is recomputed from it with the same calls ``docs/study/make_study.py`` makes and
compared with ``report/correlations.csv``, ``effects.csv``, ``diagonal.csv`` and ``claims.json``;
then each number the page cites is formatted from those files and looked up on the page.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sweeps.analysis import complete_subgrid, correlations, hyperparameter_effects, tau_table
from sweeps.posthoc.connectivity import connectivity_lines
from sweeps.spec.config import load_config

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "docs" / "study"
LR, BATCH, WIDTH = "train.lr", "train.batch_size", "model.width"


def _make_study():
    spec = importlib.util.spec_from_file_location("make_study", STUDY / "make_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ms():
    return _make_study()


@pytest.fixture(scope="module")
def results() -> pd.DataFrame:
    return pd.read_csv(STUDY / "results.csv")


@pytest.fixture(scope="module")
def claims() -> dict:
    return json.loads((STUDY / "claims.json").read_text())


@pytest.fixture(scope="module")
def page() -> str:
    return (STUDY / "index.md").read_text().replace("**", "")


def section(page: str, number: int) -> str:
    """The text of the page's section ``## <number>. ...``."""
    parts = re.split(r"\n## ", page)
    (found,) = [p for p in parts if p.startswith(f"{number}. ")]
    return flat(found)


def flat(text: str) -> str:
    """``text`` with every run of white space one space (the page wraps lines anywhere)."""
    return " ".join(text.split())


def interval(tau: float, low: float, high: float) -> str:
    return f"{tau:+.2f} [{low:+.2f}, {high:+.2f}]"


def test_the_study_config_is_a_complete_grid_with_the_diagonal_and_full_batch(results):
    cfg = load_config(ROOT / "examples" / "study.yaml")
    space = {k: d.grid() for k, d in cfg.search.space.items()}
    assert space == {LR: [0.1, 0.2, 0.4, 0.8], BATCH: [32, 64, 128, 256, "full"], WIDTH: [64, 256], "seed": [0, 1, 2]}
    assert cfg.search.sampler == "grid" and cfg.dataset.name == "mnist1d" and cfg.model.name == "mlp"
    assert cfg.train.optimizer == "sgd" and cfg.train.momentum == 0.0 and cfg.train.stop.train_loss == 0.01
    assert len(cfg.measure) == 14 and "hessian_top_eig" in cfg.train.track.metrics
    diagonal = [
        (lr, b) for lr, b in itertools.product(space[LR], space[BATCH]) if b != "full" and np.isclose(lr / b, 0.1 / 32)
    ]
    assert diagonal == [(0.1, 32), (0.2, 64), (0.4, 128), (0.8, 256)]
    # the committed run is that grid, every point exactly once
    points = list(zip(results[LR], results[BATCH].astype(str), results[WIDTH], results["seed"]))
    grid = {(lr, str(b), w, s) for lr, b, w, s in itertools.product(*space.values())}
    assert len(points) == len(grid) == 120 and set(points) == grid


def test_the_committed_tables_are_what_sweeps_analysis_computes_from_results_csv(ms, results, claims):
    grid, dropped = complete_subgrid(results)
    assert dropped == claims["subgrid"]["dropped"] and len(grid) == claims["subgrid"]["n_runs"]
    table = correlations(grid, measures=ms.STUDY_MEASURES, n_boot=ms.N_BOOT)
    committed = pd.read_csv(STUDY / "report" / "correlations.csv", index_col=0)
    numeric = [c for c in committed.columns if pd.api.types.is_numeric_dtype(committed[c])]
    pd.testing.assert_frame_equal(
        table.loc[committed.index, numeric].astype(float),
        committed[numeric].astype(float),
        check_exact=False,
        atol=1e-12,
        check_names=False,
    )
    for measure, quoted in claims["measures"].items():
        assert quoted["tau"] == pytest.approx(table.loc[measure, "tau"], abs=1e-12)
        assert quoted["Psi"]["Psi"] == pytest.approx(table.loc[measure, "Psi"], abs=1e-12)
        assert quoted["sign_error_mean"] == pytest.approx(table.loc[measure, "sign_error_mean"], abs=1e-12)

    columns = ms.SHARPNESS + [m for pair in ms.RAW_VS_ADAPTIVE for m in pair] + ["gen_gap", "test_acc"]
    effects = hyperparameter_effects(results, columns, values=ms.batch_numbers(results), n_boot=ms.N_BOOT)
    committed = pd.read_csv(STUDY / "effects.csv", index_col=[0, 1])
    pd.testing.assert_frame_equal(
        effects.astype(float),
        committed.loc[effects.index].astype(float),
        check_exact=False,
        atol=1e-12,
        check_names=False,
    )
    assert set(claims["effects"]) == {f"{k} -> {c}" for k, c in effects.index}

    diag = ms.diagonal(results).drop(columns=[BATCH])
    models = (
        diag.groupby([LR, WIDTH])[["hessian_top_eig", "keskar_sharpness", "gen_gap", "test_acc"]].mean().reset_index()
    )
    pd.testing.assert_frame_equal(models, pd.read_csv(STUDY / "diagonal.csv"), check_exact=False, atol=1e-12)
    diag_tau = tau_table(diag, measures=["hessian_top_eig", "keskar_sharpness"], n_boot=ms.N_BOOT)
    for measure, quoted in claims["diagonal"]["tau_vs_gap"].items():
        assert quoted["tau"] == pytest.approx(diag_tau.loc[measure, "tau"], abs=1e-12)
        assert quoted["ci_low"] == pytest.approx(diag_tau.loc[measure, "tau_ci_low"], abs=1e-12)


#: The Jiang et al. table and the connectivity files come from make_study.py run on a study measured
#: with `sweeps measure` (the docstring of make_study.py): until docs/study is regenerated so, the
#: checks of those files and of the page's sections on them are reported skipped, by name.
REGENERATED = pytest.mark.skipif(
    not (STUDY / "jiang.csv").exists(),
    reason="docs/study not yet regenerated with the Jiang measures and seed_barrier (make_study.py docstring)",
)


@REGENERATED
def test_the_jiang_table_is_sweeps_analysis_on_every_measure(ms, results, claims):
    grid, _ = complete_subgrid(results)
    jiang = ms.jiang_table(grid)
    committed = pd.read_csv(STUDY / "jiang.csv", index_col=0)
    assert list(committed.index) == list(jiang.index) == ms.STUDY_MEASURES + ms.JIANG_MEASURES + [ms.STEPS]
    numeric = [c for c in committed.columns if pd.api.types.is_numeric_dtype(committed[c]) and c != "added"]
    pd.testing.assert_frame_equal(
        jiang[numeric].astype(float), committed[numeric].astype(float), check_exact=False, atol=1e-12
    )
    # the study's measures come first: their numbers are the report's, to the last digit
    report = pd.read_csv(STUDY / "report" / "correlations.csv", index_col=0)
    for column in ("tau", "tau_ci_low", "tau_ci_high", "Psi", "Psi_ci_low", "Psi_ci_high", "sign_error_max"):
        assert jiang.loc[ms.STUDY_MEASURES, column].tolist() == pytest.approx(
            report.loc[ms.STUDY_MEASURES, column].tolist(), abs=1e-12, nan_ok=True
        )
    for measure, quoted in claims["jiang"].items():
        assert quoted["tau"] == pytest.approx(jiang.loc[measure, "tau"], abs=1e-12)
        assert quoted["Psi"]["Psi"] == pytest.approx(jiang.loc[measure, "Psi"], abs=1e-12, nan_ok=True)
        assert quoted["sign_error_max"] == pytest.approx(jiang.loc[measure, "sign_error_max"], nan_ok=True)
    # Jiang et al.'s numbers: only those REFERENCES.md states, nowhere else
    published = {m: (q["jiang_tau"], q["jiang_Psi"]) for m, q in claims["jiang"].items() if q["jiang_tau"] is not None}
    assert published == {"sharpness_mag_flatness": (0.48, 0.52)}


@REGENERATED
def test_the_connectivity_table_is_sweeps_connectivity_on_the_committed_barriers(ms, results, claims):
    pairs, configs = pd.read_csv(STUDY / "seed_pairs.csv"), pd.read_csv(STUDY / "seed_configs.csv")
    converged = results[results["status"] == "converged"]
    # every pair of seeds of every converged configuration, once
    assert len(pairs) == claims["connectivity"]["n_pairs"] == 3 * converged.groupby([LR, BATCH, WIDTH]).ngroups
    assert configs["n_pairs"].sum() == len(pairs) and len(configs) == claims["connectivity"]["n_configs"]
    table = ms.connectivity_table(results, configs)
    committed = pd.read_csv(STUDY / "connectivity.csv")
    pd.testing.assert_frame_equal(table, committed, check_dtype=False, check_exact=False, atol=1e-12)
    assert claims["connectivity"]["lines"] == connectivity_lines(table)
    assert claims["connectivity"]["loss_barrier_mean"] == pytest.approx(pairs["loss_barrier"].mean(), abs=1e-12)


def test_the_page_quotes_the_committed_numbers(results, claims, page):
    converged = results[results["status"] == "converged"]
    text = flat(page)
    counts = results["status"].value_counts()
    n_models = converged.groupby([LR, BATCH, WIDTH]).ngroups
    assert f"{counts['converged']} of {len(results)} trials converged; {counts['diverged']} diverged" in text
    assert f"({n_models} models from the converged trials)" in text
    sub = claims["subgrid"]
    n_env = {m["n_environments"] for m in claims["measures"].values()}
    assert f"{sub['n_models']} models from {sub['n_runs']} runs, {n_env.pop()} robust sign-error environments" in text

    effects = claims["effects"]

    def effect_row(label: str, key: str) -> str:
        e = effects[key]
        return f"| {label} | {interval(e['tau'], e['ci_low'], e['ci_high'])} | {e['n_groups']} |"

    keskar, kaur = section(page, 1), section(page, 2)
    for label, column in [
        ("lambda_max (`hessian_top_eig`)", "hessian_top_eig"),
        ("`hessian_trace`", "hessian_trace"),
        ("`keskar_sharpness` (their measure)", "keskar_sharpness"),
        ("generalization gap", "gen_gap"),
        ("test accuracy", "test_acc"),
    ]:
        assert effect_row(label, f"{BATCH} -> {column}") in keskar, label
    for label, column in [
        ("lambda_max", "hessian_top_eig"),
        ("`keskar_sharpness`", "keskar_sharpness"),
        ("generalization gap", "gen_gap"),
        ("test accuracy", "test_acc"),
    ]:
        assert effect_row(label, f"{LR} -> {column}") in kaur, label
    by_batch = converged.groupby(converged[BATCH].astype(str))[["hessian_top_eig", "gen_gap"]].mean()
    assert (
        f"lambda_max {by_batch.loc['32', 'hessian_top_eig']:.2f} at batch 32 and "
        f"{by_batch.loc['full', 'hessian_top_eig']:.2f} at full batch; the gap {by_batch.loc['32', 'gen_gap']:.3f} "
        f"and {by_batch.loc['full', 'gen_gap']:.3f}"
    ) in keskar
    by_lr = converged.groupby(LR)[["hessian_top_eig", "gen_gap"]].mean()
    assert (
        f"Mean lambda_max falls from {by_lr.loc[0.1, 'hessian_top_eig']:.2f} at lr 0.1 to "
        f"{by_lr.loc[0.8, 'hessian_top_eig']:.2f} at lr 0.8; the gap from {by_lr.loc[0.1, 'gen_gap']:.3f} to "
        f"{by_lr.loc[0.8, 'gen_gap']:.3f}"
    ) in kaur

    diagonal = section(page, 3)
    models = pd.read_csv(STUDY / "diagonal.csv")
    for width, group in models.groupby(WIDTH):
        lam = group.sort_values(LR)["hessian_top_eig"].to_numpy()
        assert f"{lam[0]:.2f} to {lam[-1]:.2f} at width {width}" in diagonal, width
        gaps = ", ".join(f"{g:.3f}" for g in group.sort_values(LR)["gen_gap"])
        assert f"{gaps} at width {width}" in diagonal, width
    t = claims["diagonal"]["tau_vs_gap"]["hessian_top_eig"]
    assert interval(t["tau"], t["ci_low"], t["ci_high"]) in diagonal
    e = claims["diagonal"]["effects"][f"{LR} -> hessian_top_eig"]
    assert f"{interval(e['tau'], e['ci_low'], e['ci_high'])}, {e['n_groups']} groups" in diagonal

    measures = section(page, 4)
    for measure, q in claims["measures"].items():
        psi = q["psi"]
        row = (
            f"| `{measure}` | {interval(q['tau'], q['ci_low'], q['ci_high'])} | "
            f"{interval(q['Psi']['Psi'], q['Psi']['ci_low'], q['Psi']['ci_high'])} | {psi[LR]:+.2f} | "
            f"{psi[BATCH]:+.2f} | {psi[WIDTH]:+.2f} | {q['sign_error_max']:.2f} | {q['sign_error_mean']:.2f} |"
        )
        assert row in measures, row
    best = {m for m, q in claims["measures"].items() if q["sign_error_max"] == 0}
    assert len(best) == 6 and all(
        f"`{m}`" in measures.split("Best by Psi")[1].split("Magnitude-aware vs raw")[0] for m in best
    )
    for pair, (raw, adaptive) in claims["width_raw_vs_adaptive"].items():
        r, a = pair.split(" vs ")
        assert f"| `{r}` | {raw:+.2f} | `{a}` | {adaptive:+.2f} |" in measures, pair
    w = effects[f"{WIDTH} -> gen_gap"]
    assert f"width vs gap: {interval(w['tau'], w['ci_low'], w['ci_high'])}, {w['n_groups']} groups" in measures

    eos, cohen = pd.read_csv(STUDY / "eos.csv"), section(page, 5)
    assert len(eos) == 24 and (eos["status"] == "converged").all() and (eos["max_ratio"] > 1).all()
    assert f"{eos['init_ratio'].min():.2f}-{eos['init_ratio'].max():.2f} x (2 / lr)" in cohen
    assert f"{eos['max_ratio'].min():.2f}-{eos['max_ratio'].max():.2f} x (2 / lr)" in cohen
    assert f"({100 * eos['share_near'].min():.0f}-{100 * eos['share_near'].max():.0f}% of the tracked points" in cohen
    assert f"{eos['late_mean_ratio'].min():.2f}-{eos['late_mean_ratio'].max():.2f})" in cohen


@REGENERATED
def test_the_page_quotes_the_jiang_and_connectivity_numbers(ms, claims, page):
    jiang = section(page, 6)
    for measure, q in claims["jiang"].items():
        row = (
            f"| `{measure}` | {ms.signed(q['tau'], q['ci_low'], q['ci_high'])} | "
            f"{ms.signed(q['Psi']['Psi'], q['Psi']['ci_low'], q['Psi']['ci_high'])} | {q['sign_error_max']:.2f} | "
            f"{ms.signed(q['jiang_tau'])} | {ms.signed(q['jiang_Psi'])} |"
        )
        assert flat(row) in jiang, row
    assert "Table 1" in jiang and "CIFAR-10" in jiang and "10,000" in jiang

    connected = section(page, 7)
    c = claims["connectivity"]
    assert f"{c['n_pairs']} seed pairs" in connected and f"{c['n_configs']} configurations" in connected
    _, barriers = ms.page_tables(claims).split("\n\n")  # the table make_study.py prints for section 7
    for row in barriers.splitlines()[2:]:
        assert row in connected, row


def test_each_claim_has_a_verdict(page):
    headings = re.findall(r"^## (\d)\. (.*)$", page, flags=re.MULTILINE)
    sections = ["1", "2", "3", "4", "5"] + (["6", "7"] if (STUDY / "jiang.csv").exists() else [])
    assert [n for n, _ in headings] == sections
    for number, heading in headings:
        if number not in ("4", "6"):  # 4: two claims, each with its verdict in bold in the text; 6: a table
            assert re.search(r": (reproduced|not reproduced|inconclusive)(, with caveats)?$", heading), heading
    assert flat(section(page, 4)).count("reproduced") >= 2


def test_every_file_the_page_cites_is_committed(page):
    targets = re.findall(r"\]\(([^)\s#]+)", page)
    assert {"batch_lr.png", "diagonal.png", "width.png", "eos.png", "results.csv", "effects.csv", "claims.json"} <= set(
        targets
    )
    if (STUDY / "jiang.csv").exists():
        assert {"jiang.csv", "connectivity.csv", "seed_pairs.csv", "seed_configs.csv"} <= set(targets)
    missing = [t for t in targets if not re.match(r"[a-z]+:", t) and not (STUDY / t).exists()]
    assert not missing, missing
