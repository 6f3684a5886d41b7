"""Regenerate the documentation figures (docs/*.png) from a small MLP trained briefly on MNIST-1D.

Usage:
    python docs/make_figures.py [--out docs] [--steps 41] [--epochs 40]

Trains two MLPs 40-64-64-10 (seeds 0 and 1; Adam, batch 128, keeping one checkpoint per epoch)
on the 4000 MNIST-1D training samples, generated offline, and writes into ``--out``:

    surface_2d_contour.png   filled contours of the loss on a filter-normalized plane
    surface_2d_3d.png        the same surface in 3D (log10 loss)
    surface_1d.png           1D loss/accuracy along three filter-normalized directions
    spectrum.png             Hessian spectral density (stochastic Lanczos quadrature)
    trajectory.png           the training path on its PCA plane, over the loss in that plane
    interpolation.png        loss/accuracy on the line between the two trained models

Takes about a minute on two CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from torch import nn

import landscape
from landscape import plots


def mnist1d_train() -> tuple[torch.Tensor, torch.Tensor]:
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())  # offline; never get_dataset (it downloads)
    return torch.as_tensor(d["x"], dtype=torch.float32), torch.as_tensor(d["y"], dtype=torch.long)


def train(x: torch.Tensor, y: torch.Tensor, seed: int, epochs: int) -> tuple[nn.Module, list[dict]]:
    """An MLP trained with Adam; returns it and one state dict per epoch (the first at init)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    checkpoints = [copy.deepcopy(model.state_dict())]
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(128):
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
        checkpoints.append(copy.deepcopy(model.state_dict()))
    return model, checkpoints


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).parent), help="folder for the PNGs (default: docs/)")
    parser.add_argument("--steps", type=int, default=41, help="grid points per axis of the 2D surfaces")
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    x, y = mnist1d_train()
    data, loss_fn = (x, y), nn.CrossEntropyLoss()
    model, checkpoints = train(x, y, seed=0, epochs=args.epochs)
    other, _ = train(x, y, seed=1, epochs=args.epochs)
    print(
        f"trained in {time.perf_counter() - start:.1f} s: train loss {landscape.ModelLoss(model, loss_fn, data).loss():.4f}"
    )

    def save(fig, name: str) -> None:
        fig.savefig(out / name, dpi=110)
        print(f"wrote {out / name} ({time.perf_counter() - start:.1f} s)")

    plane = landscape.surface_2d(model, loss_fn, data, steps=args.steps)
    save(plots.plot_surface_2d(plane), "surface_2d_contour.png")
    save(plots.plot_surface_3d(plane), "surface_2d_3d.png")

    curves = [landscape.surface_1d(model, loss_fn, data, seed=s) for s in range(3)]
    save(plots.plot_surface_1d(curves, labels=[f"seed {s}" for s in range(3)], log_scale=True), "surface_1d.png")

    spectrum = landscape.hessian_spectrum(model, loss_fn, data, num_runs=3, num_steps=50)
    save(plots.plot_spectrum(spectrum), "spectrum.png")

    pca = landscape.pca_directions(model, checkpoints)
    path_plane = landscape.surface_2d(
        model, loss_fn, data, steps=args.steps, directions=pca.directions, span=pca.span()
    )
    save(plots.plot_trajectory(pca, path_plane), "trajectory.png")

    line = landscape.interpolate(model, other, loss_fn, data)
    save(plots.plot_interpolation(line, label="seed 0 to seed 1"), "interpolation.png")


if __name__ == "__main__":
    main()
