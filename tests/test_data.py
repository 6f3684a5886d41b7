"""sweeps.trial.data: every dataset loads with the right shapes; subsampling and label noise are exact
and seeded; the IDX and CIFAR pickle readers work on tiny local files."""

from __future__ import annotations

import importlib.util
import pickle

import numpy as np
import pytest
import torch

from sweeps.spec.config import ConfigError, DatasetConfig
from sweeps.trial.data import DATASETS, add_label_noise, load_dataset, read_cifar_batch, read_idx, write_idx

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


def tiny_idx_dir(root, n_train=30, n_test=12, gz=True, seed=0):
    """IDX files of random 28x28 'digits' written with our writer (torchvision's file names)."""
    rng = np.random.default_rng(seed)
    ext = ".gz" if gz else ""
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        write_idx(root / (name + ext), arr)
    return arrays


def tiny_cifar_dir(root, per_batch=8, n_test=6, seed=0):
    """CIFAR-10 python batches (dicts with bytes keys, rows of 3072 uint8) in cifar-10-batches-py."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    labels_all = []
    for i, name in enumerate(["data_batch_1", "data_batch_2", "test_batch"]):
        n = n_test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, (n, 3072)).astype(np.uint8)
        labels = [(j + i) % 10 for j in range(n)]
        labels_all.append(labels)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)
    return labels_all


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SWEEPS_CACHE", str(tmp_path_factory.getbasetemp() / "sweeps-cache"))


def test_mnist1d_shapes_and_disk_cache(tmp_path_factory):
    d = load_dataset(DatasetConfig(name="mnist1d"))
    assert d.x_train.shape == (4000, 40) and d.x_test.shape == (1000, 40)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert d.num_classes == 10 and set(d.y_train.unique().tolist()) == set(range(10))
    assert (tmp_path_factory.getbasetemp() / "sweeps-cache" / "mnist1d" / "mnist1d.npz").exists()
    again = load_dataset(DatasetConfig(name="mnist1d"))
    assert torch.equal(again.x_train, d.x_train)


def test_mnist1d_generation_leaves_global_numpy_rng_alone(tmp_path):
    state = np.random.get_state()[1].copy()
    fresh = load_dataset(DatasetConfig(name="mnist1d", root=str(tmp_path)))  # generated again here
    assert (tmp_path / "mnist1d.npz").exists() and fresh.n_train == 4000
    assert np.array_equal(np.random.get_state()[1], state)


def test_train_size_subsample_is_seeded_and_checked():
    a = load_dataset(DatasetConfig(name="mnist1d", train_size=500, seed=0))
    b = load_dataset(DatasetConfig(name="mnist1d", train_size=500, seed=0))
    c = load_dataset(DatasetConfig(name="mnist1d", train_size=500, seed=1))
    assert a.n_train == 500 and a.n_test == 1000
    assert torch.equal(a.x_train, b.x_train) and not torch.equal(a.x_train, c.x_train)
    full = load_dataset(DatasetConfig(name="mnist1d"))
    rows = {tuple(r) for r in full.x_train.numpy().round(5).tolist()}
    assert all(tuple(r) in rows for r in a.x_train.numpy().round(5).tolist())  # a true subset
    with pytest.raises(ConfigError, match=r"dataset.train_size: 5000 exceeds the 4000 samples"):
        load_dataset(DatasetConfig(name="mnist1d", train_size=5000))


def test_label_noise_changes_exactly_that_fraction_to_other_classes():
    clean = load_dataset(DatasetConfig(name="mnist1d", train_size=1000, seed=3))
    noisy = load_dataset(DatasetConfig(name="mnist1d", train_size=1000, seed=3, label_noise=0.2))
    assert torch.equal(clean.x_train, noisy.x_train)
    assert int((clean.y_train != noisy.y_train).sum()) == 200  # every replaced label is different
    assert torch.equal(clean.y_test, noisy.y_test)  # test labels stay clean
    again = load_dataset(DatasetConfig(name="mnist1d", train_size=1000, seed=3, label_noise=0.2))
    assert torch.equal(again.y_train, noisy.y_train)
    y = torch.zeros(10, dtype=torch.long)
    assert set(add_label_noise(y, 1.0, 3, torch.Generator().manual_seed(0)).tolist()) <= {1, 2}


def test_digits_stratified_and_standardized_on_train():
    d = load_dataset(DatasetConfig(name="digits"))
    assert d.x_train.shape[1:] == (1, 8, 8) and d.n_train + d.n_test == 1797
    train_counts = torch.bincount(d.y_train, minlength=10).double() / d.n_train
    test_counts = torch.bincount(d.y_test, minlength=10).double() / d.n_test
    assert (train_counts - test_counts).abs().max() < 0.01
    flat = d.x_train.reshape(d.n_train, -1)
    std = flat.std(0, unbiased=False)
    varying = std > 0
    assert flat.mean(0).abs().max() < 1e-5 and torch.allclose(std[varying], torch.ones(int(varying.sum())), atol=1e-4)


def test_teacher_task_any_train_size_large_test_set():
    d = load_dataset(DatasetConfig(name="teacher", train_size=300, options={"input_dim": 8, "num_classes": 4}))
    assert d.x_train.shape == (300, 8) and d.x_test.shape == (10000, 8) and d.num_classes == 4
    share = torch.bincount(d.y_test, minlength=4).double() / d.n_test
    assert share.min() > 0.05  # centered logits keep every class present
    other_seed = load_dataset(
        DatasetConfig(name="teacher", train_size=300, seed=5, options={"input_dim": 8, "num_classes": 4})
    )
    assert torch.equal(other_seed.x_test, d.x_test)  # same task for every trial seed
    with pytest.raises(ConfigError, match=r"dataset.options.depth: unknown option for 'teacher'; allowed: input_dim"):
        load_dataset(DatasetConfig(name="teacher", options={"depth": 3}))


def test_idx_reader_roundtrip(tmp_path):
    arr = np.arange(2 * 3 * 4).reshape(2, 3, 4) % 256
    for name in ("a-idx3-ubyte", "b-idx3-ubyte.gz"):
        write_idx(tmp_path / name, arr)
        assert np.array_equal(read_idx(tmp_path / name), arr)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + (1).to_bytes(4, "big") + b"\x00" * 4)
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        read_idx(tmp_path / "bad")


@pytest.mark.parametrize("name, layout, gz", [("mnist", "", True), ("fashion_mnist", "FashionMNIST/raw", False)])
def test_mnist_formats_from_local_files(tmp_path, name, layout, gz):
    arrays = tiny_idx_dir(tmp_path / layout if layout else tmp_path, gz=gz)
    d = load_dataset(DatasetConfig(name=name, root=str(tmp_path), download=False))
    assert d.x_train.shape == (30, 1, 28, 28) and d.x_test.shape == (12, 1, 28, 28)
    assert d.y_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    pixels = arrays["train-images-idx3-ubyte"].astype(np.float64) / 255
    expected = (pixels - pixels.mean()) / pixels.std()  # one channel, train statistics
    assert np.allclose(d.x_train[:, 0].numpy(), expected, atol=1e-4)


def test_cifar10_pickle_batches_from_local_files(tmp_path):
    labels = tiny_cifar_dir(tmp_path)
    d = load_dataset(DatasetConfig(name="cifar10", root=str(tmp_path), download=False))
    assert d.x_train.shape == (16, 3, 32, 32) and d.x_test.shape == (6, 3, 32, 32)
    assert d.y_train.tolist() == labels[0] + labels[1] and d.y_test.tolist() == labels[2]
    x, _ = read_cifar_batch(tmp_path / "cifar-10-batches-py" / "data_batch_1")
    per_channel = d.x_train.transpose(0, 1).reshape(3, -1)
    assert per_channel.mean(1).abs().max() < 1e-4 and x.dtype == np.uint8


def test_missing_image_files_give_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="dataset.root: no mnist files in .* and dataset.download is false"):
        load_dataset(DatasetConfig(name="mnist", root=str(tmp_path / "empty"), download=False))
    if not HAS_TORCHVISION:
        with pytest.raises(ConfigError, match=r"pip install 'landscape-sweeps\[vision\]'"):
            load_dataset(DatasetConfig(name="cifar10", root=str(tmp_path / "empty")))


def test_registry_lists_all_datasets():
    assert {"mnist1d", "digits", "teacher", "mnist", "fashion_mnist", "cifar10"} <= set(DATASETS)
