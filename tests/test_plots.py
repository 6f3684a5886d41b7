"""landscape.plots: every figure has the artists it promises and saves to PNG."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib.contour import ContourSet
from matplotlib.figure import Figure
from torch import nn

import landscape
from landscape import plots


@pytest.fixture(scope="module")
def results():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    data = (torch.randn(40, 4), torch.randint(0, 3, (40,)))
    loss_fn = nn.CrossEntropyLoss()
    # a short "training run" whose checkpoints make a trajectory
    trajectory, trained = [], copy.deepcopy(model)
    opt = torch.optim.SGD(trained.parameters(), lr=0.5)
    for _ in range(6):
        trajectory.append({k: v.clone() for k, v in trained.state_dict().items()})
        opt.zero_grad()
        loss_fn(trained(data[0]), data[1]).backward()
        opt.step()
    pca = landscape.pca_directions(trained, trajectory)
    return SimpleNamespace(
        s2=landscape.surface_2d(trained, loss_fn, data, steps=9),
        s1=[landscape.surface_1d(trained, loss_fn, data, steps=9, seed=s) for s in (0, 1)],
        interp=landscape.interpolate(model, trained, loss_fn, data, steps=9),
        pca=pca,
        plane=landscape.surface_2d(trained, loss_fn, data, steps=9, directions=pca.directions, span=pca.span()),
        spectrum=landscape.hessian_spectrum(trained, loss_fn, data, num_runs=2, num_steps=10),
    )


def contour_sets(ax) -> list[ContourSet]:
    return [c for c in ax.collections if isinstance(c, ContourSet)]


def saves(fig: Figure, path) -> None:
    fig.savefig(path)
    assert path.stat().st_size > 1000


def test_surface_2d_contours_colorbar_and_3d(results, tmp_path):
    fig = plots.plot_surface_2d(results.s2)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    filled = [c for c in contour_sets(ax) if c.filled]
    lines = [c for c in contour_sets(ax) if not c.filled]
    assert len(filled) == 1 and len(lines) == 1
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "loss"  # the colorbar
    assert "alpha" in ax.get_xlabel() and "beta" in ax.get_ylabel()
    saves(fig, tmp_path / "contour.png")

    lines_only = plots.plot_surface_2d(results.s2, filled=False, quantity="accuracy", log_scale=False)
    assert [c.filled for c in contour_sets(lines_only.axes[0])] == [False]
    both = plots.plot_surface_2d(results.s2, three_d=True)
    assert sum(ax.name == "3d" for ax in both.axes) == 1
    saves(both, tmp_path / "both.png")
    fig3 = plots.plot_surface_3d(results.s2)
    assert fig3.axes[0].name == "3d" and len(fig3.axes[0].collections) == 1
    saves(fig3, tmp_path / "surface3d.png")
    with pytest.raises(ValueError, match="quantity"):
        plots.plot_surface_2d(results.s2, quantity="acc")


def test_surface_1d_one_line_per_curve(results, tmp_path):
    fig = plots.plot_surface_1d(results.s1, labels=["seed 0", "seed 1"])
    ax = fig.axes[0]
    assert len(ax.get_lines()) == 2
    np.testing.assert_array_equal(ax.get_lines()[1].get_ydata(), results.s1[1].loss)
    assert len(fig.axes) == 2 and len(fig.axes[1].get_lines()) == 2  # accuracy on the twin axis
    saves(fig, tmp_path / "curves.png")
    no_acc = plots.plot_surface_1d(results.s1[0], accuracy=False)
    assert len(no_acc.axes) == 1 and len(no_acc.axes[0].get_lines()) == 1
    regression = landscape.Surface1D(
        alphas=np.linspace(-1, 1, 5),
        loss=np.arange(5.0),
        accuracy=None,
        directions=[{}],
        center_loss=2.0,
        center_accuracy=None,
    )
    assert len(plots.plot_surface_1d([regression, results.s1[0]]).axes[1].get_lines()) == 1
    with pytest.raises(ValueError, match="labels"):
        plots.plot_surface_1d(results.s1, labels=["one"])
    with pytest.raises(TypeError, match="surfaces"):
        plots.plot_surface_1d([results.s2])


def test_interpolation_plot_marks_the_segment(results, tmp_path):
    fig = plots.plot_interpolation(results.interp)
    ax = fig.axes[0]
    assert len(ax.patches) == 1  # the shaded segment [0, 1]
    assert len(ax.get_lines()) == 2  # the curve and the end points
    assert "barrier" in ax.get_title()
    saves(fig, tmp_path / "interp.png")


def test_spectrum_plot_is_log_scaled(results, tmp_path):
    fig = plots.plot_spectrum(results.spectrum)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    assert len(ax.get_lines()) == 2  # density and Ritz values
    saves(fig, tmp_path / "spectrum.png")
    plain = SimpleNamespace(grid=np.linspace(-1, 1, 50), density=np.exp(-(np.linspace(-1, 1, 50) ** 2)))
    assert len(plots.plot_spectrum(plain).axes[0].get_lines()) == 1
    with pytest.raises(TypeError, match="spectrum"):
        plots.plot_spectrum(object())


def test_trajectory_over_its_plane(results, tmp_path):
    fig = plots.plot_trajectory(results.pca, results.plane)
    ax = fig.axes[0]
    assert len(contour_sets(ax)) == 2
    path = [l for l in ax.get_lines() if l.get_label() == "trajectory"][0]
    np.testing.assert_allclose(path.get_xydata(), results.pca.coords)
    # the path lies inside the surface's grid
    assert np.abs(results.pca.coords[:, 0]).max() < results.plane.alphas.max()
    assert "PC 1" in ax.get_xlabel()
    saves(fig, tmp_path / "trajectory.png")
    assert len(plots.plot_trajectory(results.pca).axes) == 1


def test_draws_into_a_given_axes():
    fig = Figure()
    axes = fig.subplots(1, 2)
    assert plots.plot_spectrum(SimpleNamespace(grid=[0, 1], density=[0.5, 0.5]), ax=axes[1]) is fig
