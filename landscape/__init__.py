"""landscape: the loss landscape of a trained PyTorch model, measured.

Hessian-vector products, eigenvalues, trace and spectral density; Gauss-Newton and Fisher
operators; sharpness measures and the generalization measures of Jiang et al. 2020; 1D/2D loss
surfaces and their plots. Pure PyTorch (+ numpy, scipy, matplotlib): give it a model, a loss
function and data, get numbers and figures back. The model is never modified.

Public names are imported lazily, so ``import landscape`` is cheap and a name costs only its
own module.
"""

from __future__ import annotations

from ._exports import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "ModelLoss": "._functional",
    "NonDeterministicLossError": "._functional",
    "weights_only": "._functional",
    "HessianOperator": ".hvp",
    "hessian_eigenvalues": ".eigen",
    "EigenResult": ".eigen",
    "lanczos": ".eigen",
    "power_iteration": ".eigen",
    "hessian_trace": ".trace",
    "TraceResult": ".trace",
    "estimate_trace": ".trace",
    "hessian_spectrum": ".spectrum",
    "SpectrumResult": ".spectrum",
    "spectral_density": ".spectrum",
    "measure": ".metrics",
    "METRICS": ".metrics",
    "register_metric": ".metrics",
    "Metric": ".metrics",
    "MeasureContext": ".metrics",
    "keskar_sharpness": ".keskar",
    "worst_case_sharpness": ".m_sharpness",
    "average_sharpness": ".m_sharpness",
    "pacbayes_flatness": ".flatness",
    "sharpness_flatness": ".flatness",
    "filter_curvature": ".curvature",
    "adaptive_trace": ".curvature",
    "CurvatureResult": ".curvature",
    "as_hessian": ".hvp",
    "Adapter": ".metrics",
    "check_request": ".metrics",
    "filter_normalized_directions": ".directions",
    "weight_norms": ".norms",
    "param_count": ".norms",
    "distance_from_init": ".norms",
    "random_directions": ".directions",
    "direction_to": ".directions",
    "pca_directions": ".directions",
    "TrajectoryPCA": ".directions",
    "surface_1d": ".surface",
    "surface_2d": ".surface",
    "interpolate": ".interpolation",
    "Surface1D": ".surface",
    "Surface2D": ".surface",
    "Interpolation": ".interpolation",
    "loss_at_points": ".evaluate",
    "loss_at_parameters": ".evaluate",
    "plots": ".plots",
    "CurvatureOperator": ".hvp",
    "GGNOperator": ".ggn",
    "EmpiricalFisherOperator": ".ggn",
    "ggn_eigenvalues": ".ggn",
    "ggn_trace": ".ggn",
    "linear_path": ".connectivity",
    "LinearPath": ".connectivity",
    "fisher_trace": ".ggn",
    "init_distances": ".norms",
    "output_margin": ".generalization",
    "MarginResult": ".generalization",
    "inverse_margin": ".generalization",
    "margin_normalized": ".generalization",
    "path_norm": ".generalization",
    "path_norm_over_margin": ".generalization",
    "pacbayes_bounds": ".generalization",
    "PacBayesBounds": ".generalization",
    "fisher_rao_norm": ".generalization",
    "steps_to_loss": ".generalization",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
