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


def test_official_val_layout_with_ground_truth(tmp_path):
    root = tmp_path / "imagenet"
    imgs = images(6, size=12)
    for cls in ["n03", "n01", "n02"]:  # train's sorted class folders give the label names
        (root / "train" / cls).mkdir(parents=True)
        Image.fromarray(imgs[0]).save(root / "train" / cls / "a.JPEG")
    (root / "val").mkdir()
    for i in range(6):
        Image.fromarray(imgs[i]).save(root / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG", format="PNG")  # lossless
    truth = ["n02", "n01", "n03", "n03", "n01", "n02"]
    rows = [f"ILSVRC2012_val_{i + 1:08d},{c} 1 2 30 40 {c} 5 6 7 8" for i, c in enumerate(truth)]
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows[::-1]) + "\n")
    val = open_source(root, "val")
    assert val.label_names == ["n01", "n02", "n03"] == open_source(root, "train").label_names
    assert [val[i][1] for i in range(6)] == [1, 0, 2, 2, 0, 1] and len(val) == 6
    np.testing.assert_array_equal(val[3][0], imgs[3])
    assert val.key(0) == "ILSVRC2012_val_00000001_JPEG"
    assert val.describe()["labels_file"].endswith("LOC_val_solution.csv")

    # the simple format beside a flat folder, label names from synsets.txt (in its order)
    flat = tmp_path / "flat" / "val"
    flat.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(imgs[i]).save(flat / f"x{i}.png")
    (flat / "val_labels.txt").write_text("x0.png cat\nx1, dog\nx2\tcat\n")
    (tmp_path / "flat" / "synsets.txt").write_text("dog a dog\ncat a cat\n")
    small = open_source(tmp_path / "flat", "val")
    assert small.label_names == ["dog", "cat"] and [small[i][1] for i in range(3)] == [1, 0, 1]

    # a ground-truth line naming a missing image, an image without a line, an unknown class
    (flat / "val_labels.txt").write_text("x0.png cat\nx1.png dog\nx2.png cat\nx9.png dog\n")
    with pytest.raises(ValueError, match=r"val_labels.txt: names 1 image\(s\) that are not in .*x9.png"):
        open_source(tmp_path / "flat", "val")
    (flat / "val_labels.txt").write_text("x0.png cat\nx1.png dog\n")
    with pytest.raises(ValueError, match=r"1 image\(s\) have no line in .*val_labels.txt: x2.png"):
        open_source(tmp_path / "flat", "val")
    (flat / "val_labels.txt").write_text("x0.png cat\nx1.png dog\nx2.png emu\n")
    with pytest.raises(ValueError, match="x2.png has class 'emu', which is not in .*synsets.txt"):
        open_source(tmp_path / "flat", "val")


def test_flat_folder_is_listed_with_scandir_names_only(tmp_path, monkeypatch):
    import os

    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ["c.png", "a.jpg", "b.PNG"]:
        Image.fromarray(images(1, size=4)[0]).save(flat / name, format="PNG")
    (flat / "notes.txt").write_text("x")
    (flat / ".cache").mkdir()  # hidden: not a class folder
    monkeypatch.setattr(os, "listdir", lambda *a: pytest.fail("a flat folder must not be read with listdir"))
    isfile = os.path.isfile
    monkeypatch.setattr(os.path, "isfile", lambda p: pytest.fail("no stat per file")
                        if os.path.dirname(os.fspath(p)) == str(flat) and os.fspath(p).endswith("g") else isfile(p))
    source = open_source(flat)
    assert source.files == ["a.jpg", "b.PNG", "c.png"] and not source.has_labels
    assert [source.key(i) for i in range(3)] == ["a_jpg", "b_PNG", "c_png"] and source[1][0].shape == (4, 4, 3)


def test_tar_archives_of_images_in_tar_order(tmp_path):
    import io
    import tarfile

    imgs = images(5, size=6)

    def add(tar, name, payload):
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))

    def png(i):
        buf = io.BytesIO()
        Image.fromarray(imgs[i]).save(buf, format="PNG")
        return buf.getvalue()

    (tmp_path / "web" / "train").mkdir(parents=True)
    with tarfile.open(tmp_path / "web" / "train" / "b-000001.tar", "w") as tar:
        for i, key in [(3, "zz"), (4, "aa")]:  # tar order, not name order
            add(tar, f"{key}.cls", str(i % 2).encode())
            add(tar, f"{key}.jpg", png(i))
    with tarfile.open(tmp_path / "web" / "train" / "a-000000.tar", "w") as tar:
        for i in range(3):
            add(tar, f"dir/s{i}.jpg", png(i))
            add(tar, f"dir/s{i}.json", b"{}")
            add(tar, f"dir/s{i}.cls", str(i % 2).encode())
    source = open_source(tmp_path / "web", "train")
    assert source.kind == "tar" and len(source) == 5 and source.label_names == ["0", "1"]
    assert [source.key(i) for i in range(5)] == ["a-000000_dir_s0", "a-000000_dir_s1", "a-000000_dir_s2",
                                                 "b-000001_zz", "b-000001_aa"]
    for i, want in enumerate([0, 1, 2, 3, 4]):
        image, label = source[i]
        np.testing.assert_array_equal(image, imgs[want])
        assert label == want % 2

    one = open_source(tmp_path / "web" / "train" / "b-000001.tar")  # a single archive
    assert len(one) == 2 and one.has_labels

    from igpt_ds.data.shards import BuildSettings, build_shards  # an archive source builds shards

    pal = np.random.default_rng(0).uniform(-1, 1, (16, 3)).astype(np.float32)
    built = build_shards(source, str(tmp_path / "out"), pal, BuildSettings(resolution=4, shard_size=3), progress=False)
    assert built["num_samples"] == 5 and built["source"]["type"] == "tar" and built["has_labels"]
    with tarfile.open(tmp_path / "nolabels.tar", "w") as tar:
        add(tar, "x.png", png(0))
    assert not open_source(tmp_path / "nolabels.tar").has_labels
    with tarfile.open(tmp_path / "z.tar", "w:gz") as tar:
        add(tar, "x.png", png(0))
    with pytest.raises(ValueError, match="not an uncompressed tar"):
        open_source(tmp_path / "z.tar")
