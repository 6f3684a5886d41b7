"""Figures of loss surfaces, interpolations, trajectories and Hessian spectra.

Every function returns a :class:`matplotlib.figure.Figure` built without ``pyplot`` (so it never
opens a window, touches global state or needs a display); save it with ``fig.savefig(path)``,
log it with ``mlflow.log_figure(fig, "surface.png")``, or let Jupyter show it. Pass ``ax=`` to
draw into an existing axes instead (the function then returns ``ax.figure``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, NullLocator

from .interpolation import Interpolation
from .surface import Surface1D, Surface2D

__all__ = [
    "plot_surface_2d",
    "plot_surface_3d",
    "plot_surface_1d",
    "plot_interpolation",
    "plot_spectrum",
    "plot_trajectory",
]

_CMAP = "viridis"


def _axes(ax: Axes | None, figsize: tuple[float, float], projection: str | None = None) -> tuple[Figure, Axes]:
    if ax is not None:
        # a SubFigure when ax lies in one: the plots use only what it shares with Figure
        return cast(Figure, ax.figure), ax
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot(projection=projection)


def _grid_values(surface: Surface2D, quantity: str) -> np.ndarray:
    if quantity not in ("loss", "accuracy"):
        raise ValueError(f"quantity: must be 'loss' or 'accuracy' (got {quantity!r})")
    values = getattr(surface, quantity)
    if values is None:
        raise ValueError("quantity: this surface has no accuracy (not a classification loss); use 'loss'")
    return np.asarray(values, dtype=np.float64)


def _levels(values: np.ndarray, n: int, log: bool) -> tuple[np.ndarray, Normalize]:
    """``n + 1`` contour levels over the finite values; log-spaced when ``log`` and all > 0."""
    finite = values[np.isfinite(values)]
    lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        hi = lo + max(abs(lo), 1.0) * 1e-6
    if log and lo > 0:
        return np.geomspace(lo, hi, n + 1), LogNorm(lo, hi)
    return np.linspace(lo, hi, n + 1), Normalize(lo, hi)


def _colorbar(fig: Figure, ax: Axes, mappable: Any, label: str) -> None:
    """Colorbar with a handful of readable ticks (log norms get log-spaced ticks)."""
    bar = fig.colorbar(mappable, ax=ax, label=label)
    norm = mappable.norm
    if isinstance(norm, LogNorm):
        assert norm.vmin is not None and norm.vmax is not None
        bar.set_ticks(np.geomspace(norm.vmin, norm.vmax, 7).tolist())
        bar.ax.yaxis.set_minor_locator(NullLocator())
    bar.ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))


def _legend_below(ax: Axes, handles: list, names: list[str]) -> None:
    ax.legend(handles, names, fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)


def _direction_labels(ax: Axes, surface: Surface2D) -> None:
    kind = f"{surface.normalization}-normalized " if surface.normalization not in (None, "none") else ""
    ax.set_xlabel(rf"$\alpha$ along {kind}$d_1$")
    ax.set_ylabel(rf"$\beta$ along {kind}$d_2$")


def _contour(ax: Axes, surface: Surface2D, quantity: str, levels: int, filled: bool, log_scale: bool) -> Any:
    """Draw (filled) contours of ``surface`` on ``ax``; return the mappable for a colorbar."""
    values = _grid_values(surface, quantity)
    lv, norm = _levels(values, levels, log_scale and quantity == "loss")
    # loss[i, j] is at (alphas[i], betas[j]): x = alpha runs along the first index
    A, B = np.meshgrid(surface.alphas, surface.betas, indexing="ij")
    mappable = None
    if filled:
        mappable = ax.contourf(A, B, values, levels=lv, norm=norm, cmap=_CMAP)
    lines = ax.contour(
        A,
        B,
        values,
        levels=lv,
        norm=norm,
        colors="k" if filled else None,
        cmap=None if filled else _CMAP,
        linewidths=0.5,
        alpha=0.6 if filled else 1.0,
    )
    ax.plot([0.0], [0.0], marker="*", color="tab:red", markersize=12, linestyle="none", label="model")
    ax.set_aspect("auto")
    return mappable if mappable is not None else lines


def plot_surface_2d(
    surface: Surface2D,
    *,
    quantity: str = "loss",
    levels: int = 30,
    filled: bool = True,
    log_scale: bool = True,
    three_d: bool = False,
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Contour plot of a 2D surface (filled contours and iso-lines by default) with a colorbar.

    Args:
        surface: from :func:`landscape.surface_2d`.
        quantity: ``"loss"`` (default) or ``"accuracy"``.
        levels: number of contour intervals.
        filled: filled contours under the lines (default) or lines only.
        log_scale: log-spaced loss levels and colors (default; loss surfaces span decades).
        three_d: add a second panel with the 3D surface (ignored when ``ax`` is given).
        title: axes title (default: the quantity and the model's loss).
        ax: draw into this axes instead of a new figure.
    """
    if ax is None and three_d:
        fig = Figure(figsize=(11, 4.5), layout="constrained")
        ax = fig.add_subplot(1, 2, 1)
        plot_surface_3d(surface, quantity=quantity, log_scale=log_scale, ax=fig.add_subplot(1, 2, 2, projection="3d"))
    fig, ax = _axes(ax, (5.5, 4.5))
    mappable = _contour(ax, surface, quantity, levels, filled, log_scale)
    _colorbar(fig, ax, mappable, quantity)
    _direction_labels(ax, surface)
    ax.set_title(title or f"{quantity} surface (model loss {surface.center_loss:.4g})")
    return fig


def plot_surface_3d(
    surface: Surface2D,
    *,
    quantity: str = "loss",
    log_scale: bool = True,
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """3D surface plot of a 2D surface; with ``log_scale`` the z axis shows ``log10(loss)``."""
    from mpl_toolkits.mplot3d import Axes3D

    fig, ax = _axes(ax, (6, 5), projection="3d")
    assert isinstance(ax, Axes3D)
    values = _grid_values(surface, quantity)
    log = log_scale and quantity == "loss" and np.nanmin(values) > 0
    z = np.log10(values) if log else values
    A, B = np.meshgrid(surface.alphas, surface.betas, indexing="ij")
    ax.plot_surface(A, B, z, cmap=_CMAP, linewidth=0, antialiased=True, rcount=80, ccount=80)
    _direction_labels(ax, surface)
    ax.set_zlabel(f"log10 {quantity}" if log else quantity)
    ax.set_title(title or f"{quantity} surface")
    return fig


def _curves(surfaces: Any) -> list[Surface1D | Interpolation]:
    items = list(surfaces) if isinstance(surfaces, Sequence) else [surfaces]
    bad = [type(s).__name__ for s in items if not isinstance(s, (Surface1D, Interpolation))]
    if not items or bad:
        raise TypeError(
            f"surfaces: expected Surface1D/Interpolation objects (or a list of them), got {bad or 'nothing'}"
        )
    return items


def plot_surface_1d(
    surfaces: Surface1D | Interpolation | Sequence[Surface1D | Interpolation],
    *,
    labels: Sequence[str] | None = None,
    accuracy: bool = True,
    log_scale: bool = False,
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Loss along one or more 1D curves, one line each (accuracy dashed on a right axis).

    Args:
        surfaces: a :class:`~landscape.Surface1D` or :class:`~landscape.Interpolation`, or a list
            (e.g. one surface per seed or per model, to compare).
        labels: legend entries, one per curve (default ``"curve i"``).
        accuracy: also draw accuracy (where the curves have it) on a twin axis.
        log_scale: log-scaled loss axis.
    """
    items = _curves(surfaces)
    if labels is not None and len(labels) != len(items):
        raise ValueError(f"labels: got {len(labels)} for {len(items)} curves")
    labels = list(labels) if labels is not None else [f"curve {i}" for i in range(len(items))]
    fig, ax = _axes(ax, (6, 4))
    colors = [f"C{i % 10}" for i in range(len(items))]
    for s, label, color in zip(items, labels, colors):
        ax.plot(s.alphas, s.loss, color=color, label=f"{label} loss")
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel(r"$\alpha$" if isinstance(items[0], Surface1D) else "t (0: model A, 1: model B)")
    ax.set_ylabel("loss")
    handles, names = ax.get_legend_handles_labels()
    with_acc = [(s, lab, c) for s, lab, c in zip(items, labels, colors) if s.accuracy is not None]
    if accuracy and with_acc:
        twin = ax.twinx()
        for s, label, color in with_acc:
            assert s.accuracy is not None
            twin.plot(s.alphas, s.accuracy, color=color, linestyle="--", label=f"{label} accuracy")
        twin.set_ylabel("accuracy")
        twin.set_ylim(-0.02, 1.02)
        more_h, more_n = twin.get_legend_handles_labels()
        handles, names = handles + more_h, names + more_n
    _legend_below(ax, handles, names)
    ax.set_title(title or "loss along a direction")
    return fig


def plot_interpolation(
    interpolation: Interpolation,
    *,
    accuracy: bool = True,
    label: str = "A to B",
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Loss (and accuracy) along the line from model A (t = 0) to model B (t = 1), with the
    segment shaded and the barrier annotated."""
    if not isinstance(interpolation, Interpolation):
        raise TypeError(f"interpolation: expected an Interpolation, got {type(interpolation).__name__}")
    fig = plot_surface_1d(interpolation, labels=[label], accuracy=accuracy, ax=ax)
    ax = fig.axes[0] if ax is None else ax
    ax.axvspan(0.0, 1.0, color="0.9", zorder=0)
    ax.plot([0.0, 1.0], [interpolation.loss_a, interpolation.loss_b], "o", color="tab:red", label="end points")
    handles: list[Any] = []
    names: list[str] = []
    for a in sorted(ax.get_shared_x_axes().get_siblings(ax), key=lambda a: a is not ax):
        more_h, more_n = a.get_legend_handles_labels()
        handles, names = handles + more_h, names + more_n
    _legend_below(ax, handles, names)
    ax.set_title(title or f"linear interpolation: barrier {interpolation.barrier:.4g}")
    return fig


def plot_spectrum(
    spectrum: Any,
    *,
    ritz: bool = True,
    floor: float = 1e-12,
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Spectral density of the Hessian on a log-scaled y axis.

    Args:
        spectrum: any object with ``.grid`` (eigenvalue axis) and ``.density`` (same length),
            such as :class:`landscape.SpectrumResult`; its ``.ritz_values`` (if any) are marked
            as ticks along the bottom.
        ritz: draw the Ritz values.
        floor: densities below it are drawn at it (a log axis cannot show 0).
    """
    grid, density = getattr(spectrum, "grid", None), getattr(spectrum, "density", None)
    if grid is None or density is None:
        raise TypeError("spectrum: needs .grid and .density (e.g. a landscape.SpectrumResult)")
    grid = np.asarray(grid, dtype=np.float64).reshape(-1)
    density = np.asarray(density, dtype=np.float64).reshape(-1)
    if grid.shape != density.shape:
        raise ValueError(f"spectrum: .grid {grid.shape} and .density {density.shape} differ in length")
    fig, ax = _axes(ax, (6, 4))
    ax.semilogy(grid, np.maximum(density, floor), color="C0", label="density")
    values = getattr(spectrum, "ritz_values", None)
    if ritz and values is not None:
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        values = values[np.isfinite(values)]  # runs that stopped early are NaN-padded
        ax.plot(values, np.full_like(values, floor), "|", color="tab:red", markersize=12, label="Ritz values")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.legend(fontsize="small")
    ax.set_title(title or "Hessian spectral density")
    return fig


def plot_trajectory(
    pca: Any,
    surface: Surface2D | None = None,
    *,
    levels: int = 30,
    log_scale: bool = True,
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """A training trajectory projected on its PCA plane, over the loss in that plane.

    Args:
        pca: from :func:`landscape.pca_directions` (``.coords`` ``[T, 2]``,
            ``.explained_variance_ratio``).
        surface: a :func:`landscape.surface_2d` computed with ``directions=pca.directions`` (and
            e.g. ``span=pca.span()``); drawn as filled contours under the path when given.
    """
    coords = np.asarray(pca.coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise ValueError("pca: needs .coords of shape [T, 2] (pca_directions with k=2)")
    fig, ax = _axes(ax, (5.5, 4.5))
    if surface is not None:
        mappable = _contour(ax, surface, "loss", levels, True, log_scale)
        _colorbar(fig, ax, mappable, "loss")
    ax.plot(
        coords[:, 0],
        coords[:, 1],
        "-o",
        color="white" if surface is not None else "C0",
        markeredgecolor="k",
        markersize=4,
        linewidth=1.5,
        label="trajectory",
    )
    ax.plot(coords[:1, 0], coords[:1, 1], "s", color="tab:orange", markeredgecolor="k", label="start")
    ratio = np.asarray(pca.explained_variance_ratio, dtype=np.float64)
    ax.set_xlabel(f"PC 1 ({100 * ratio[0]:.1f}% of variance)")
    ax.set_ylabel(f"PC 2 ({100 * ratio[1]:.1f}% of variance)")
    ax.legend(fontsize="small", loc="best")
    ax.set_title(title or "training trajectory on its PCA plane")
    return fig
