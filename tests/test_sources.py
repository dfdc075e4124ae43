"""Every image source format behind open_source, with synthetic files."""
import pickle

import numpy as np
import pytest
from PIL import Image

from igpt_ds.data.sources import BadImageError, open_source


def images(n, seed=0, size=32):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def write_cifar10(root, batches=(1, 2), per_batch=5):
    root.mkdir()
    expected = []
    for b in batches:
        imgs = images(per_batch, seed=b)
        labels = [(b + i) % 10 for i in range(per_batch)]
        data = imgs.transpose(0, 3, 1, 2).reshape(per_batch, -1)  # R, G, B planes per row
        with open(root / f"data_batch_{b}", "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"filenames": [b"x.png"] * per_batch,
                         b"batch_label": b"batch"}, f)
        expected += list(zip(imgs, labels))
    names = [f"class{i}".encode() for i in range(10)]
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names}, f)
    return expected


def test_cifar10_train_and_missing_test(tmp_path):
    expected = write_cifar10(tmp_path / "cifar-10-batches-py")
    source = open_source(tmp_path / "cifar-10-batches-py", "train")
    assert source.kind == "cifar10" and len(source) == 10 and source.label_names[3] == "class3"
    for i, (image, label) in enumerate(expected):
        got, got_label = source[i]
        np.testing.assert_array_equal(got, image)
        assert got.shape == (32, 32, 3) and got.dtype == np.uint8 and got_label == label
    keys = [source.key(i) for i in range(len(source))]
    assert len(set(keys)) == 10 and all("." not in k for k in keys)
    with pytest.raises(ValueError) as e:
        open_source(tmp_path / "cifar-10-batches-py", "test")
    assert "test_batch" in str(e.value) and "val-fraction" in str(e.value)


def test_cifar100(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    imgs = images(4)
    with open(root / "train", "wb") as f:
        pickle.dump({b"data": imgs.transpose(0, 3, 1, 2).reshape(4, -1), b"fine_labels": [5, 99, 0, 7],
                     b"coarse_labels": [0, 1, 2, 3]}, f)
    with open(root / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)]}, f)
    source = open_source(root, "train")
    assert source.kind == "cifar100" and len(source.label_names) == 100
    np.testing.assert_array_equal(source[1][0], imgs[1])
    assert source[1][1] == 99
    with pytest.raises(ValueError, match="'test'"):
        open_source(root, "test")


def test_stl10_column_major_layout(tmp_path):
    root = tmp_path / "stl10_binary"
    root.mkdir()
    imgs = images(3, size=96)
    imgs[0, 0, 5] = [255, 0, 0]  # row 0, column 5: red, tells rows from columns
    imgs.transpose(0, 3, 2, 1).tofile(root / "train_X.bin")  # channel planes, column-major
    np.array([1, 10, 3], np.uint8).tofile(root / "train_y.bin")
    images(2, seed=9, size=96).transpose(0, 3, 2, 1).tofile(root / "unlabeled_X.bin")
    train = open_source(root, "train")
    assert train.kind == "stl10" and len(train) == 3 and train.label_names[0] == "airplane"
    np.testing.assert_array_equal(train[0][0], imgs[0])
    assert [train[i][1] for i in range(3)] == [0, 9, 2]
    unlabeled = open_source(root, "unlabeled")
    assert len(unlabeled) == 2 and unlabeled[1][1] == -1 and unlabeled.label_names == []


def test_image_folders_and_corrupt_file(tmp_path):
    root = tmp_path / "imagenet" / "train"
    imgs = images(4, size=20)
    for i, cls in enumerate(["n02", "n01", "n01", "n02"]):
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(imgs[i]).save(root / cls / f"img.{i}.png")
    Image.fromarray(imgs[0]).convert("L").save(root / "n01" / "gray.png")  # converted to RGB
    source = open_source(tmp_path / "imagenet", "train")
    assert source.label_names == ["n01", "n02"] and len(source) == 5
    labels = [source[i][1] for i in range(5)]
    assert labels == [0, 0, 0, 1, 1]
    assert source[2][0].shape == (20, 20, 3)
    assert all("." not in source.key(i) and "/" not in source.key(i) for i in range(5))

    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(imgs[1]).save(flat / "a.png")
    (flat / "broken.jpg").write_bytes(b"not a jpeg")
    source = open_source(flat, "train")
    assert source.label_names == [] and len(source) == 2
    np.testing.assert_array_equal(source[0][0], imgs[1])
    assert source[0][1] == -1
    with pytest.raises(BadImageError, match="broken.jpg"):
        source[1]


def test_npz_and_held_out_split(tmp_path):
    imgs = images(50, size=8)
    np.savez(tmp_path / "d.npz", images=imgs, labels=np.arange(50) % 3, label_names=np.array(["a", "b", "c"]))
    full = open_source(tmp_path / "d.npz")
    assert full.kind == "npz" and len(full) == 50 and full.label_names == ["a", "b", "c"]
    train = open_source(tmp_path / "d.npz", "train", val_fraction=0.04, split_seed=1)
    val = open_source(tmp_path / "d.npz", "val", val_fraction=0.04, split_seed=1)
    assert len(val) == 2 and len(train) == 48
    keys = lambda s: {s.key(i) for i in range(len(s))}  # noqa: E731
    assert keys(train).isdisjoint(keys(val)) and keys(train) | keys(val) == keys(full)
    assert keys(val) == keys(open_source(tmp_path / "d.npz", "val", val_fraction=0.04, split_seed=1))
    assert keys(val) != keys(open_source(tmp_path / "d.npz", "val", val_fraction=0.04, split_seed=2))
    image, label = val[0]
    index = int(val.key(0).rsplit("_", 1)[1])
    np.testing.assert_array_equal(image, imgs[index])
    assert label == index % 3
    with pytest.raises(ValueError, match="val-fraction"):
        open_source(tmp_path / "d.npz", "val")
    np.savez(tmp_path / "bad.npz", pixels=imgs)
    with pytest.raises(ValueError, match="'images'"):
        open_source(tmp_path / "bad.npz")
