"""Sharpness of a minimum: how much the loss (or accuracy) degrades under bounded perturbations.

All measures perturb the flat parameter vector ``w`` (the variables of a
:class:`~landscape.ModelLoss`, by default every parameter with ``requires_grad``) and never touch
the user's model. Perturbations are written ``delta = c * z`` with a per-coordinate scale ``c``
and a free vector ``z`` in a ball, so "adaptive" (``c = |w|``) and plain (``c = 1``) versions share
one optimizer and one sampler:

* :func:`keskar_sharpness`: Keskar et al. 2017 epsilon-sharpness
  ``100 (max_{|y_i| <= eps(|w_i|+1)} L(w+y) - L(w)) / (1 + L(w))`` (percent).
* :func:`worst_case_sharpness`: ``max_{||delta/c||_p <= rho} L(w+delta) - L(w)``
  (Andriushchenko et al. 2023; adaptive ``c = |w|`` after Kwon et al. 2021), Auto-PGD ascent.
* :func:`average_sharpness`: ``E[L(w+delta)] - L(w)``, ``delta ~ N(0, rho^2 diag(c^2))``.
  Both are m-sharpness (Foret et al. 2021): computed per batch of ``m`` examples and averaged.
* :func:`pacbayes_flatness`: Jiang et al. 2020 ``1/sigma'^2`` from the largest noise level
  that costs 0.1 of training accuracy (Dziugaite & Roy 2017); magnitude-aware by default.
* :func:`sharpness_flatness`: Jiang et al. 2020 ``1/alpha'^2``, the worst-case counterpart.

The adaptive, filter-normalized and magnitude-aware measures are invariant under the
rescalings of Dinh et al. 2017 (a ReLU layer times ``a``, the next times ``1/a``); the raw ones
are not. Losses are in the units of ``loss_fn``; all randomness comes from ``seed`` (CPU
generator, so the same seed gives the same draws on every device).

The measures are defined in :mod:`landscape.keskar`, :mod:`landscape.m_sharpness` and
:mod:`landscape.flatness` (shared plumbing in ``landscape._perturbation`` and
``landscape._ascent``); this module re-exports their public names, and those of
:mod:`landscape.curvature` that lived here before, so every ``landscape.sharpness`` import keeps
working.
"""

from __future__ import annotations

from ._perturbation import Norm
from .curvature import CurvatureResult, adaptive_trace, filter_curvature
from .flatness import FlatnessResult, pacbayes_flatness, perturbation_scale, sharpness_flatness
from .keskar import KeskarResult, keskar_sharpness
from .m_sharpness import (
    AVERAGE_RHO,
    WORST_RHO,
    SharpnessResult,
    average_sharpness,
    normalize_logits,
    worst_case_sharpness,
)

__all__ = [
    "AVERAGE_RHO",
    "WORST_RHO",
    "CurvatureResult",
    "FlatnessResult",
    "KeskarResult",
    "Norm",
    "SharpnessResult",
    "adaptive_trace",
    "average_sharpness",
    "filter_curvature",
    "keskar_sharpness",
    "normalize_logits",
    "pacbayes_flatness",
    "perturbation_scale",
    "sharpness_flatness",
    "worst_case_sharpness",
]
