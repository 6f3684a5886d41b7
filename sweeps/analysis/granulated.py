"""Granulated Kendall coefficients (Jiang et al. 2020): tau-b inside the groups of models that
differ in one hyperparameter only, averaged per hyperparameter (psi_k) and over them (Psi), with
a two-stage bootstrap. The groups themselves (:func:`_groups_differing_only_in`) are also the
environments of the sign-error and the groups of the hyperparameter effects."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .ranks import kendall_tau_b


def _groups_differing_only_in(models: pd.DataFrame, keys: Sequence[str], k: str) -> list[np.ndarray]:
    """Model indices grouped by the values of every key but ``k``: each group differs only in k."""
    others = [c for c in keys if c != k]
    if not others:
        return [models.index.to_numpy()]
    return list(models.groupby(others, dropna=False, sort=True).indices.values())


def granulated_kendall(
    mu: np.ndarray,
    g: np.ndarray,
    models: pd.DataFrame,
    keys: Sequence[str],
    hyperparameters: Sequence[str],
    *,
    n_boot: int = 0,
    rng: np.random.Generator | None = None,
) -> tuple[dict[str, float], float, np.ndarray]:
    """psi_k = mean over the settings of the other keys of tau-b over the models differing only in k.

    A group where ``mu`` or ``g`` is constant has no ranking to compare and is skipped. Returns
    ``({k: psi_k}, Psi, Psi_boot)``, ``Psi`` = mean_k psi_k. The bootstrap is two-stage: resample
    the groups of each k, then the models inside each resampled group; ``Psi_boot`` has shape
    ``(n_boot,)``.
    """
    psi, boot = {}, []
    for k in hyperparameters:
        groups = _groups_differing_only_in(models, keys, k)
        taus = np.array([kendall_tau_b(mu[gr], g[gr]) for gr in groups])
        psi[k] = float(np.nanmean(taus)) if np.isfinite(taus).any() else math.nan
        if n_boot:
            assert rng is not None, "n_boot > 0 needs an rng"
            within = np.stack(
                [
                    kendall_tau_b(mu[gr], g[gr], counts=rng.multinomial(len(gr), np.full(len(gr), 1 / len(gr)), n_boot))
                    for gr in groups
                ]
            )  # (groups, n_boot)
            pick = rng.integers(len(groups), size=(n_boot, len(groups)))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                boot.append(np.nanmean(within[pick, np.arange(n_boot)[:, None]], axis=1))
    Psi = float(np.mean(list(psi.values()))) if psi else math.nan
    Psi_boot = np.mean(boot, axis=0) if boot else np.full(n_boot, np.nan)
    return psi, Psi, Psi_boot
