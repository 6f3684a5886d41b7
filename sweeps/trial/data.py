"""Datasets as in-memory tensors, deterministic by seed.

Every dataset is one loader function registered in :data:`DATASETS` by
:func:`register_dataset`; :func:`load_dataset` calls it (the raw data is cached in memory per
process, and on disk where generation is slow) and then applies the per-trial changes that do
not depend on the dataset: ``train_size`` / ``test_size`` subsampling and ``label_noise``, both
drawn from ``dataset.seed``.

=================  ==================  ========  ==========  ====================================
name               inputs              classes   train/test  source
=================  ==================  ========  ==========  ====================================
``mnist1d``        ``[40]``            10        4000/1000   ``mnist1d`` generator (offline, seed 42)
``digits``         ``[1, 8, 8]``       10        1257/540    scikit-learn ``load_digits``, stratified
``teacher``        ``[input_dim]``     options   any/10000   random teacher MLP on Gaussian inputs
``mnist``          ``[1, 28, 28]``     10        60000/10000 idx files (torchvision downloads them)
``fashion_mnist``  ``[1, 28, 28]``     10        60000/10000 idx files (torchvision downloads them)
``cifar10``        ``[3, 32, 32]``     10        50000/10000 python pickle batches (torchvision)
=================  ==================  ========  ==========  ====================================

Inputs are float32 and standardized with training-set statistics (per feature for ``digits``,
per channel for images; ``mnist1d`` comes standardized); labels are int64.

The disk cache lives in ``$SWEEPS_CACHE`` or ``~/.cache/landscape-sweeps``.
"""

from __future__ import annotations

import gzip
import inspect
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ..spec.errors import ConfigError

if TYPE_CHECKING:  # annotations only: config.py imports this module to check dataset names
    from ..spec.config import DatasetConfig


@dataclass
class Dataset:
    """Train and test tensors of one task.

    Attributes:
        x_train, x_test: float32 inputs ``[N, *input_shape]``.
        y_train, y_test: int64 labels ``[N]`` in ``0 .. num_classes - 1``.
        num_classes: number of classes C.
        name: registry name.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def n_train(self) -> int:
        return len(self.y_train)

    @property
    def n_test(self) -> int:
        return len(self.y_test)

    def to(self, device: str | torch.device) -> Dataset:
        """A copy with all tensors on ``device``."""
        move = {k: getattr(self, k).to(device) for k in ("x_train", "y_train", "x_test", "y_test")}
        return Dataset(self.name, num_classes=self.num_classes, **move)


Raw = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]  # x, y, x_test, y_test, C
Loader = Callable[..., Raw]

DATASETS: dict[str, Loader] = {}


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    """Decorator: register ``fn(root: Path, download: bool, train_size: int | None, **options)``
    returning ``(x_train, y_train, x_test, y_test, num_classes)`` as numpy arrays."""

    def deco(fn: Loader) -> Loader:
        DATASETS[name] = fn
        return fn

    return deco


def cache_dir() -> Path:
    """``$SWEEPS_CACHE`` or ``~/.cache/landscape-sweeps`` (created on demand)."""
    path = Path(os.environ.get("SWEEPS_CACHE") or Path.home() / ".cache" / "landscape-sweeps")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _standardize(x_train: np.ndarray, x_test: np.ndarray, axis: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Center and scale both splits with the training statistics over ``axis``."""
    mean = x_train.mean(axis=axis, keepdims=True)
    std = x_train.std(axis=axis, keepdims=True)
    std = np.where(std > 0, std, 1.0)
    return ((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32)


# --- generated / bundled -------------------------------------------------------------------
@register_dataset("mnist1d")
def _mnist1d(root: Path, download: bool, train_size: int | None) -> Raw:
    """The standard MNIST-1D (generator seed 42), generated offline and cached as .npz."""
    path = root / "mnist1d.npz"
    if not path.exists():
        import random

        from mnist1d.data import get_dataset_args, make_dataset

        saved = random.getstate(), np.random.get_state()  # the generator reseeds both globally
        try:
            d = make_dataset(get_dataset_args())
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.npz")
        np.savez(tmp, x=d["x"], y=d["y"], x_test=d["x_test"], y_test=d["y_test"])
        os.replace(tmp, path)
    with np.load(path) as d:
        return d["x"].astype(np.float32), d["y"], d["x_test"].astype(np.float32), d["y_test"], 10


@register_dataset("digits")
def _digits(root: Path, download: bool, train_size: int | None, test_fraction: float = 0.3) -> Raw:
    """scikit-learn's 8x8 digits; fixed stratified split (random_state 0), shape [1, 8, 8]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=0)
    x_tr, x_te = _standardize(x_tr, x_te, axis=(0,))
    return x_tr.reshape(-1, 1, 8, 8), y_tr, x_te.reshape(-1, 1, 8, 8), y_te, 10


@register_dataset("teacher")
def _teacher(
    root: Path,
    download: bool,
    train_size: int | None,
    input_dim: int = 20,
    num_classes: int = 10,
    teacher_width: int = 64,
    teacher_depth: int = 2,
    test_size: int = 10_000,
    teacher_seed: int = 0,
) -> Raw:
    """Gaussian inputs ``N(0, I_input_dim)`` labelled by the argmax of a random tanh MLP.

    The teacher (``teacher_depth`` hidden layers of ``teacher_width``, weights N(0, 1/fan_in))
    and the inputs depend only on ``teacher_seed``, so every trial sees the same task. Logits
    are centered per class (means over the test inputs) so the classes are roughly balanced.
    Default 4000 training samples (``train_size``) and 10000 test samples.
    """
    n_train = train_size or 4000
    rng = np.random.default_rng(teacher_seed)
    dims = [input_dim] + [teacher_width] * teacher_depth + [num_classes]
    weights = [rng.standard_normal((a, b)) / np.sqrt(a) for a, b in zip(dims[:-1], dims[1:])]

    def logits(x: np.ndarray) -> np.ndarray:
        for w in weights[:-1]:
            x = np.tanh(x @ w)
        return x @ weights[-1]

    x_test = rng.standard_normal((test_size, input_dim))
    x_train = rng.standard_normal((n_train, input_dim))
    shift = logits(x_test).mean(axis=0)
    label = lambda x: (logits(x) - shift).argmax(axis=1)  # noqa: E731
    return x_train.astype(np.float32), label(x_train), x_test.astype(np.float32), label(x_test), num_classes


# --- image files (torchvision layout) ------------------------------------------------------
def _open(path: Path) -> Any:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (MNIST format; ``.gz`` allowed): big-endian magic, dims, uint8 data."""
    with _open(Path(path)) as f:
        data = f.read()
    zero, dtype_code, ndim = data[0] * 256 + data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (the inverse of :func:`read_idx`; for tests/tools)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


_IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
_TORCHVISION = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10"}


def _find_idx(root: Path, folder: str) -> dict[str, Path] | None:
    """The four IDX files in ``root`` or ``root/<folder>/raw`` (torchvision), plain or .gz."""
    for base in (root, root / folder / "raw"):
        found = {}
        for key, stem in _IDX_FILES.items():
            hits = [base / (stem + ext) for ext in ("", ".gz") if (base / (stem + ext)).exists()]
            if hits:
                found[key] = hits[0]
        if len(found) == 4:
            return found
    return None


def _torchvision_download(name: str, root: Path) -> None:
    try:
        import torchvision
    except ImportError:
        raise ConfigError(
            f"dataset.name: {name!r} needs torchvision to download its files into {root}: "
            "pip install 'landscape-sweeps[vision]' (or put the files there yourself)"
        ) from None
    cls = getattr(torchvision.datasets, _TORCHVISION[name])
    for train in (True, False):
        cls(str(root), train=train, download=True)


def _missing(name: str, root: Path, download: bool) -> None:
    if not download:
        raise ConfigError(f"dataset.root: no {name} files in {root} and dataset.download is false (got {str(root)!r})")
    _torchvision_download(name, root)


def _idx_dataset(name: str, root: Path, download: bool) -> Raw:
    folder = _TORCHVISION[name]
    files = _find_idx(root, folder)
    if files is None:
        _missing(name, root, download)
        files = _find_idx(root, folder)
        assert files is not None
    arr = {k: read_idx(p) for k, p in files.items()}
    x_tr = arr["train_x"].astype(np.float32)[:, None] / 255.0
    x_te = arr["test_x"].astype(np.float32)[:, None] / 255.0
    x_tr, x_te = _standardize(x_tr, x_te, axis=(0, 2, 3))
    return x_tr, arr["train_y"].astype(np.int64), x_te, arr["test_y"].astype(np.int64), 10


@register_dataset("mnist")
def _mnist(root: Path, download: bool, train_size: int | None) -> Raw:
    """MNIST from IDX files in ``root`` (or ``root/MNIST/raw``), [1, 28, 28]."""
    return _idx_dataset("mnist", root, download)


@register_dataset("fashion_mnist")
def _fashion_mnist(root: Path, download: bool, train_size: int | None) -> Raw:
    """Fashion-MNIST from IDX files in ``root`` (or ``root/FashionMNIST/raw``), [1, 28, 28]."""
    return _idx_dataset("fashion_mnist", root, download)


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python pickle batch -> (uint8 images ``[n, 3, 32, 32]``, labels ``[n]``)."""
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    return np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


@register_dataset("cifar10")
def _cifar10(root: Path, download: bool, train_size: int | None) -> Raw:
    """CIFAR-10 from ``root/cifar-10-batches-py`` (data_batch_1..5, test_batch), [3, 32, 32]."""
    folder = root / "cifar-10-batches-py"
    train_files = sorted(folder.glob("data_batch_*"))
    if not train_files or not (folder / "test_batch").exists():
        _missing("cifar10", root, download)
        train_files = sorted(folder.glob("data_batch_*"))
    parts = [read_cifar_batch(p) for p in train_files]
    x_tr = np.concatenate([p[0] for p in parts]).astype(np.float32) / 255.0
    y_tr = np.concatenate([p[1] for p in parts])
    x_te, y_te = read_cifar_batch(folder / "test_batch")
    x_tr, x_te = _standardize(x_tr, x_te.astype(np.float32) / 255.0, axis=(0, 2, 3))
    return x_tr, y_tr, x_te, y_te, 10


# --- per-trial changes ---------------------------------------------------------------------
@lru_cache(maxsize=8)
def _raw(name: str, root: str, download: bool, train_size: int | None, options: tuple) -> Raw:
    return DATASETS[name](Path(root), download, train_size, **dict(options))


def _check_options(name: str, options: dict[str, Any]) -> None:
    params = inspect.signature(DATASETS[name]).parameters
    allowed = [p for p in list(params)[3:]]
    unknown = [k for k in options if k not in allowed]
    if unknown:
        hint = f"allowed: {', '.join(allowed)}" if allowed else f"{name!r} takes no options"
        raise ConfigError(f"dataset.options.{unknown[0]}: unknown option for {name!r}; {hint}")


def subsample(n: int, size: int | None, generator: torch.Generator, field: str) -> Tensor | None:
    """Indices of a random subset of ``size`` out of ``n`` (``None`` when all are kept)."""
    if size is None or size == n:
        return None
    if size > n:
        raise ConfigError(f"{field}: {size} exceeds the {n} samples available (got {size})")
    return torch.randperm(n, generator=generator)[:size].sort().values


def add_label_noise(y: Tensor, fraction: float, num_classes: int, generator: torch.Generator) -> Tensor:
    """Replace ``round(fraction * n)`` labels, chosen at random, by a different random class."""
    y = y.clone()
    k = int(round(fraction * len(y)))
    if k:
        idx = torch.randperm(len(y), generator=generator)[:k]
        shift = torch.randint(1, num_classes, (k,), generator=generator)
        y[idx] = (y[idx] + shift) % num_classes
    return y


def load_dataset(cfg: DatasetConfig) -> Dataset:
    """Load ``cfg.name`` and apply ``train_size``, ``test_size`` and ``label_noise`` (seeded by
    ``cfg.seed``). Raises :class:`~sweeps.spec.errors.ConfigError` for sizes/options that do not fit."""
    _check_options(cfg.name, cfg.options)
    root = Path(cfg.root).expanduser() if cfg.root else cache_dir() / cfg.name
    options = tuple(sorted(cfg.options.items()))
    x_np, y_np, x_te_np, y_te_np, num_classes = _raw(cfg.name, str(root), cfg.download, cfg.train_size, options)
    x, y = torch.from_numpy(np.ascontiguousarray(x_np)), torch.from_numpy(np.asarray(y_np, dtype=np.int64))
    x_te = torch.from_numpy(np.ascontiguousarray(x_te_np))
    y_te = torch.from_numpy(np.asarray(y_te_np, dtype=np.int64))
    gen = torch.Generator().manual_seed(cfg.seed)
    keep = subsample(len(y), cfg.train_size, gen, "dataset.train_size")
    if keep is not None:
        x, y = x[keep], y[keep]
    keep = subsample(len(y_te), cfg.test_size, gen, "dataset.test_size")
    if keep is not None:
        x_te, y_te = x_te[keep], y_te[keep]
    if cfg.label_noise:
        y = add_label_noise(y, cfg.label_noise, num_classes, gen)
    return Dataset(cfg.name, x.clone(), y.clone(), x_te.clone(), y_te.clone(), num_classes)
