"""Shard building: content, determinism, restart after interruption, skipping bad images, CLI."""
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from igpt_ds.data import shards as shards_module
from igpt_ds.data.shards import BuildSettings, ShardError, build_shards, read_manifest, resize_view
from igpt_ds.data.sources import open_source
from igpt_ds.palette import palette_sha256, quantize, save_palette

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def palette(seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (512, 3)).astype(np.float32)


def npz_source(tmp_path, n=23, size=12, seed=0):
    imgs = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=imgs, labels=np.arange(n) % 4)
    return imgs, open_source(tmp_path / "d.npz")


def read_tar(path):
    samples = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_shards_hold_quantized_views_and_manifest(tmp_path):
    imgs, source = npz_source(tmp_path)
    pal = palette()
    settings = BuildSettings(resolution=8, shard_size=10, seed=3)
    result = build_shards(source, str(tmp_path / "out"), pal, settings, progress=False)
    m = read_manifest(tmp_path / "out")
    assert [s.samples for s in m.shards] == [10, 10, 3] and m.num_samples == 23 == result["num_samples"]
    assert m.palette_sha256 == palette_sha256(pal) and m.resolution == 8 and m.label_names == ("0", "1", "2", "3")
    assert m.data["source"]["type"] == "npz" and m.data["build"]["seed"] == 3
    assert sorted(os.listdir(tmp_path / "out")) == ["dataset.json", "train-000000.tar", "train-000001.tar",
                                                    "train-000002.tar"]
    seen = {}
    for path in m.shard_paths():
        seen.update(read_tar(path))
    assert len(seen) == 23
    for key, sample in seen.items():
        assert "." not in key and key.endswith("_v0")
        index = int(key.split("_")[1])
        expected = quantize(resize_view(imgs[index], 8, "center")[None], pal)[0]
        np.testing.assert_array_equal(np.frombuffer(sample["tokens"], "<u2"), expected)
        assert int(sample["cls"]) == index % 4


def test_resize_modes():
    image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    assert resize_view(image, 16, "center").shape == (16, 16, 3)
    a = resize_view(image, 16, "random-resized", np.random.default_rng([1, 2]))
    b = resize_view(image, 16, "random-resized", np.random.default_rng([1, 2]))
    c = resize_view(image, 16, "random-resized", np.random.default_rng([1, 3]))
    assert a.shape == (16, 16, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_output_is_independent_of_worker_count_and_views(tmp_path):
    _, source = npz_source(tmp_path, n=9)
    settings = BuildSettings(resolution=8, shard_size=4, seed=1, crop="random-resized", views=2)
    one = build_shards(source, str(tmp_path / "w1"), palette(), settings, workers=1, progress=False)
    two = build_shards(source, str(tmp_path / "w2"), palette(), settings, workers=2, progress=False)
    # one sample per image holding its 2 views; shard_size counts images
    assert one["num_samples"] == 9 and one["views"] == 2 and [s["samples"] for s in one["shards"]] == [4, 4, 1]
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in two["shards"]]
    samples = {k: v for path in read_manifest(tmp_path / "w1").shard_paths() for k, v in read_tar(path).items()}
    assert len(samples) == 9 and all(k.endswith("_k2") for k in samples)
    assert all(len(v["tokens"]) == 2 * 2 * 64 for v in samples.values())  # 2 views x 64 uint16 tokens


def test_interrupted_build_resumes_without_redoing_shards(tmp_path, monkeypatch):
    _, source = npz_source(tmp_path)
    settings = BuildSettings(resolution=8, shard_size=5, seed=0)
    clean = build_shards(source, str(tmp_path / "clean"), palette(), settings, progress=False)
    out = tmp_path / "out"
    real_write, calls = shards_module._write_tar, []

    def write_then_die(path, *args):
        calls.append(os.path.basename(path))
        if len(calls) == 3:  # killed while writing the third shard: half a file under .tmp
            with open(path + ".tmp", "wb") as f:
                f.write(b"\0" * 700)
            raise KeyboardInterrupt
        real_write(path, *args)

    monkeypatch.setattr(shards_module, "_write_tar", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_shards(source, str(out), palette(), settings, progress=False)
    names = sorted(os.listdir(out))
    assert "dataset.json" not in names and "train-000002.tar" not in names and "train-000002.tar.tmp" in names
    monkeypatch.setattr(shards_module, "_write_tar", real_write)
    resumed = build_shards(source, str(out), palette(), settings, progress=False, log=lambda s: None)
    assert resumed["reused"] == ["train-000000.tar", "train-000001.tar"]
    assert resumed["built"] == ["train-000002.tar", "train-000003.tar", "train-000004.tar"]
    assert resumed["shards"] == clean["shards"]
    assert not any(n.endswith(".tmp") or n.startswith(".") for n in os.listdir(out))

    # A finished shard damaged later is found by its hash and rebuilt; the others are kept.
    with open(out / "train-000001.tar", "r+b") as f:
        f.truncate(1024)
    again = build_shards(source, str(out), palette(), settings, progress=False, log=lambda s: None)
    assert again["built"] == ["train-000001.tar"] and again["shards"] == clean["shards"]

    with pytest.raises(ShardError, match="different build"):
        build_shards(source, str(out), palette(), BuildSettings(resolution=8, shard_size=5, seed=1), progress=False)


def test_skip_bad_lists_unreadable_images(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "cat").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((10, 10, 3), 40 * i, np.uint8)).save(folder / "cat" / f"{i}.png")
    (folder / "cat" / "bad.png").write_bytes(b"\x89PNG broken")
    source = open_source(folder)
    settings = BuildSettings(resolution=8, shard_size=2)
    with pytest.raises(ValueError, match="bad.png"):
        build_shards(source, str(tmp_path / "strict"), palette(), settings, progress=False)
    assert not os.path.exists(tmp_path / "strict" / "dataset.json")
    result = build_shards(source, str(tmp_path / "lenient"), palette(),
                          BuildSettings(resolution=8, shard_size=2, skip_bad=True), progress=False)
    assert result["num_samples"] == 3 and len(result["skipped"]) == 1
    assert "bad.png" in result["skipped"][0]["error"] and result["skipped"][0]["key"] == "cat_bad_png"
    on_disk = json.loads((tmp_path / "lenient" / "dataset.json").read_text())
    assert on_disk["skipped"] == result["skipped"] and on_disk["num_images"] == 3


def test_build_shards_cli_with_held_out_split(tmp_path):
    npz_source(tmp_path, n=25)
    save_palette(tmp_path / "palette.npy", palette())
    cmd = [sys.executable, os.path.join(REPO, "tools", "build_shards.py"), "--data", str(tmp_path / "d.npz"),
           "--palette", str(tmp_path / "palette.npy"), "--resolution", "8", "--out", str(tmp_path / "out"),
           "--shard-size", "10", "--val-fraction", "0.2", "--no-progress"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    train, val = read_manifest(tmp_path / "out" / "train"), read_manifest(tmp_path / "out" / "val")
    assert (train.num_samples, val.num_samples) == (20, 5)
    assert val.shards[0].name == "val-000000.tar" and train.data["build"]["args"]["val_fraction"] == 0.2
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0 and "0 built, 2 kept" in rerun.stdout


def test_held_out_split_is_centre_cropped_whatever_the_training_crop(tmp_path):
    imgs, _ = npz_source(tmp_path, n=20, size=16)
    save_palette(tmp_path / "palette.npy", palette())
    cmd = [sys.executable, os.path.join(REPO, "tools", "build_shards.py"), "--data", str(tmp_path / "d.npz"),
           "--palette", str(tmp_path / "palette.npy"), "--resolution", "8", "--out", str(tmp_path / "out"),
           "--val-fraction", "0.25", "--crop", "random-resized", "--views", "3", "--no-progress"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "val: centre crops" in result.stdout
    train, val = read_manifest(tmp_path / "out" / "train"), read_manifest(tmp_path / "out" / "val")
    assert train.data["build"]["crop"] == "random-resized" and train.num_samples == 15 and train.views == 3
    assert val.data["build"]["crop"] == "center" and val.data["build"]["views"] == 1 and val.num_samples == 5
    # the val tokens are the centre crops of their images (a key names the source index: d_<index>_v<view>)
    samples = read_tar(tmp_path / "out" / "val" / val.shards[0].name)
    assert len(samples) == 5
    for key, sample in samples.items():
        index = int(key.split("_")[1])
        tokens = np.frombuffer(sample["tokens"], dtype="<u2")
        want = quantize(resize_view(imgs[index], 8, "center")[None], palette())[0]
        assert np.array_equal(tokens, np.asarray(want).reshape(-1)), key


def test_manifest_carries_the_palette_bit_exactly(tmp_path):
    from igpt_ds.data.tokens import build_loader

    _, source = npz_source(tmp_path, n=6, size=8)
    pal = palette(5)
    pal[:6] = [[-0.0, 1.0, -1.0], [1.4e-45, -1.4e-45, 0.0], [np.nextafter(np.float32(1), np.float32(0)), 0.1, -0.1],
               [1 / 3, -2 / 3, 1e-30], [0.5, -0.5, 0.25], [0.7, -0.3, 0.9]]
    pal = pal.astype(np.float32)
    build_shards(source, str(tmp_path / "out"), pal, BuildSettings(resolution=8, shard_size=6), progress=False)
    m = read_manifest(tmp_path / "out")
    assert m.palette.dtype == np.float32 and m.palette.tobytes() == pal.tobytes()  # -0.0 and subnormals too
    assert palette_sha256(m.palette) == m.palette_sha256 == palette_sha256(pal)
    loader = build_loader(str(tmp_path / "out"), batch_size=2, dp_rank=0, dp_world_size=1, num_workers=0)
    assert loader.palette.tobytes() == pal.tobytes()
    file = tmp_path / "out" / "dataset.json"
    data = json.loads(file.read_text())
    assert len(file.read_text().splitlines()) < 600  # one line per colour

    # A palette edited after the build (one float32 ulp) no longer hashes to palette_sha256: refused.
    data["palette"][7][1] = float(np.nextafter(np.float32(data["palette"][7][1]), np.float32(2)))
    file.write_text(json.dumps(data))
    with pytest.raises(ShardError, match=r"dataset.json: field 'palette' hashes to .* palette_sha256"):
        read_manifest(tmp_path / "out")
    data["palette"] = data["palette"][:-1]
    file.write_text(json.dumps(data))
    with pytest.raises(ShardError, match=r"dataset.json: field 'palette'.*shape"):
        read_manifest(tmp_path / "out")

    # A manifest from before the field existed still loads; it carries no palette.
    del data["palette"]
    file.write_text(json.dumps(data))
    assert read_manifest(tmp_path / "out").palette is None
    loader = build_loader(str(tmp_path / "out"), batch_size=2, dp_rank=0, dp_world_size=1, num_workers=0,
                          expected_palette_sha256=palette_sha256(pal))
    assert loader.palette is None and next(iter(loader))["tokens"].shape == (2, 64)
    # Re-running the same build keeps its shards and adds the palette to the manifest.
    again = build_shards(source, str(tmp_path / "out"), pal, BuildSettings(resolution=8, shard_size=6), progress=False)
    assert again["built"] == [] and read_manifest(tmp_path / "out").palette.tobytes() == pal.tobytes()


def test_two_nodes_then_merge_equal_one_node_build(tmp_path):
    _, source = npz_source(tmp_path, n=23)
    settings = BuildSettings(resolution=8, shard_size=4, seed=2)  # 6 shards: node 0 gets 0, 2, 4
    one = build_shards(source, str(tmp_path / "one"), palette(), settings, progress=False)
    out = str(tmp_path / "two")
    with pytest.raises(ValueError, match="--node-rank 2 with --num-nodes 2"):
        build_shards(source, out, palette(), settings, progress=False, num_nodes=2, node_rank=2)
    assert not os.path.exists(out)
    node0 = build_shards(source, out, palette(), settings, progress=False, num_nodes=2, node_rank=0)
    assert node0["built"] == ["train-000000.tar", "train-000002.tar", "train-000004.tar"]
    assert sorted(os.listdir(out)) == [".slice-0-of-2.json"] + node0["built"]
    with pytest.raises(ShardError, match=r"\.slice-1-of-2\.json \(--node-rank 1\).*nothing was written"):
        build_shards(source, out, palette(), settings, progress=False, num_nodes=2, merge=True)
    assert "dataset.json" not in os.listdir(out)
    node1 = build_shards(source, out, palette(), settings, progress=False, num_nodes=2, node_rank=1)
    again = build_shards(source, out, palette(), settings, progress=False, num_nodes=2, node_rank=1, log=lambda s: None)
    assert again["built"] == [] and again["reused"] == node1["built"]  # a re-run node keeps its shards
    merged = build_shards(source, out, palette(), settings, progress=False, num_nodes=2, merge=True)
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "one"))  # slices removed
    for name in os.listdir(out):
        if name != "dataset.json":
            assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    a, b = (json.loads((tmp_path / d / "dataset.json").read_text()) for d in ("one", "two"))
    a["build"].pop("created"), b["build"].pop("created")
    assert a == b and merged["shards"] == one["shards"]
    text = [(tmp_path / d / "dataset.json").read_text().splitlines() for d in ("one", "two")]
    assert [x for x in text[0] if '"created"' not in x] == [x for x in text[1] if '"created"' not in x]
    # merging again re-checks the shards against the manifest; a damaged shard names its node
    build_shards(source, out, palette(), settings, progress=False, num_nodes=2, merge=True)
    with open(tmp_path / "two" / "train-000003.tar", "r+b") as f:
        f.truncate(512)
    with pytest.raises(ShardError, match="train-000003.tar: missing, or its size.*--node-rank 1 --num-nodes 2"):
        build_shards(source, out, palette(), settings, progress=False, num_nodes=2, merge=True)


def test_build_shards_cli_refuses_a_node_rank_outside_num_nodes(tmp_path):
    npz_source(tmp_path, n=4)
    save_palette(tmp_path / "palette.npy", palette())
    cmd = [sys.executable, os.path.join(REPO, "tools", "build_shards.py"), "--data", str(tmp_path / "d.npz"),
           "--palette", str(tmp_path / "palette.npy"), "--out", str(tmp_path / "out"), "--num-nodes", "2",
           "--node-rank", "-1", "--no-progress"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "--node-rank -1 with --num-nodes 2" in result.stderr
    assert not os.path.exists(tmp_path / "out")
