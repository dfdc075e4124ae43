"""The on-the-fly image path: image shards cropped and quantized in the loader workers."""
import tarfile

import numpy as np

from igpt_ds.data.image_shards import ImageShardLoader, build_image_shards
from igpt_ds.data.shards import BuildSettings, build_shards
from igpt_ds.data.sources import open_source
from igpt_ds.data.tokens import build_loader
from igpt_ds.palette import quantize


def _source(tmp_path, n=20, side=16):
    images = np.random.default_rng(0).integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.arange(n) % 3)
    return open_source(tmp_path / "d.npz")


def _prequantized_views(shard_dir, seq_len, views):
    """key of the source image -> (views, seq_len) tokens, from every shard of a pre-quantized set."""
    out = {}
    for path in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".tokens"):
                    raw = tar.extractfile(member).read()
                    key = member.name.rsplit("_k", 1)[0]
                    out[key] = np.frombuffer(raw, "<u2").astype(np.int64).reshape(views, seq_len)
    return out


def test_on_the_fly_tokens_equal_the_prequantized_shards_for_the_same_crop(tmp_path):
    # Source images already at the store side, so the stored PNG is the source image itself.
    source, palette = _source(tmp_path), np.random.default_rng(1).uniform(-1, 1, (64, 3)).astype(np.float32)
    build_shards(source, str(tmp_path / "pre"), palette,
                 BuildSettings(resolution=8, shard_size=7, seed=5, crop="random-resized", views=2), progress=False)
    build_image_shards(source, str(tmp_path / "img"), palette, resolution=8, store_side=16, shard_size=6, seed=3)
    pre = _prequantized_views(tmp_path / "pre", 64, 2)
    loader = build_loader(tmp_path / "img", batch_size=4, dp_rank=0, dp_world_size=1, num_workers=2, seed=5,
                          epochs=2, drop_last=False)
    assert isinstance(loader, ImageShardLoader) and loader.crop == "random-resized"
    seen = {0: {}, 1: {}}
    for batch in loader:
        for key, tokens, label in zip(batch["keys"], batch["tokens"], batch["labels"]):
            seen[loader.epoch][key] = tokens.numpy()
            assert int(label) == int(key.rsplit("_", 1)[-1]) % 3  # npz keys end in the image index
    for epoch in (0, 1):  # epoch e of the on-the-fly path is view e of the pre-quantized build (same seed)
        assert sorted(seen[epoch]) == sorted(pre)
        for key, tokens in seen[epoch].items():
            np.testing.assert_array_equal(tokens, pre[key][epoch])
    assert any((seen[0][k] != seen[1][k]).any() for k in pre)  # a new crop each epoch


def test_image_shards_store_side_centre_crop_and_resume(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, (12, 20, 30, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=images)
    palette = np.random.default_rng(1).uniform(-1, 1, (32, 3)).astype(np.float32)
    manifest = build_image_shards(open_source(tmp_path / "d.npz"), str(tmp_path / "img"), palette, resolution=5)
    assert manifest["store_side"] == 10 and manifest["content"] == "images"
    with tarfile.open(tmp_path / "img" / "train-000000.tar") as tar:
        from PIL import Image
        png = next(m for m in tar.getmembers() if m.name.endswith(".png"))
        assert Image.open(tar.extractfile(png)).size == (15, 10)  # shorter side 10
    val = build_loader(tmp_path / "img", batch_size=4, dp_rank=0, dp_world_size=1, num_workers=0,
                       shuffle=False, epochs=1, expected_resolution=5)
    assert val.crop == "center"
    from igpt_ds.data.image_shards import store_image
    from igpt_ds.data.shards import resize_view
    for batch in val:
        for key, tokens in zip(batch["keys"], batch["tokens"]):
            i = int(key.rsplit("_", 1)[-1])
            view = resize_view(store_image(images[i], 10), 5, "center")
            np.testing.assert_array_equal(tokens.numpy(), quantize(view[None], palette, device="cpu")[0])
    # resume mid-epoch: the rest of the epoch is what an uninterrupted run gives
    full = [b["keys"] for b in build_loader(tmp_path / "img", batch_size=2, dp_rank=0, dp_world_size=1,
                                            num_workers=2, epochs=1)]
    first = build_loader(tmp_path / "img", batch_size=2, dp_rank=0, dp_world_size=1, num_workers=2, epochs=1)
    it = iter(first)
    next(it), next(it)
    state = first.state_dict()
    again = build_loader(tmp_path / "img", batch_size=2, dp_rank=0, dp_world_size=1, num_workers=2, epochs=1)
    again.load_state_dict(state)
    assert [b["keys"] for b in again] == full[2:]


def test_cli_and_two_pretraining_steps_on_image_shards(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from layouts import write_ds_config

    from igpt_ds.palette import save_palette
    from igpt_ds.testing import launch
    from igpt_ds.train.metrics import read_metrics

    root = Path(__file__).resolve().parents[1]
    _source(tmp_path, n=40, side=12)
    save_palette(tmp_path / "palette.npy", np.random.default_rng(1).uniform(-1, 1, (512, 3)).astype(np.float32))
    out = subprocess.run([sys.executable, str(root / "tools" / "build_image_shards.py"), "--data",
                          str(tmp_path / "d.npz"), "--palette", str(tmp_path / "palette.npy"), "--resolution", "8",
                          "--out", str(tmp_path / "img"), "--val-fraction", "0.2", "--shard-size", "10"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "shorter side 16" in out.stdout
    cfg = write_ds_config(tmp_path / "ds.json", 4)
    results = launch([str(root / "igpt_ds" / "pretrain.py"), "--resolution", "8", "--no-progress",
                      "--train-data", str(tmp_path / "img" / "train"), "--val-data", str(tmp_path / "img" / "val"),
                      "--eval-interval", "2", "--num-workers", "1", "--deepspeed_config", cfg,
                      "--train-steps", "2", "--save", str(tmp_path / "run")], 1, timeout=300, cwd=str(root),
                     env={"DS_ACCELERATOR": "cpu"})
    assert results[0].returncode == 0, results[0].stderr[-4000:]
    records = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    assert [r["step"] for r in records if "loss" in r][-1] == 2
    assert any(np.isfinite(r.get("val_loss", np.nan)) for r in records)


def test_image_shard_benchmark_runs_on_small_images():
    from igpt_ds.planning.bench_data import image_shard_throughput

    images = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    palette = np.random.default_rng(1).uniform(-1, 1, (16, 3)).astype(np.float32)
    r = image_shard_throughput(images, palette, 4, num_workers=1, batch_size=8, min_samples=80, shard_size=10)
    assert r["samples"] == 80 and r["epochs"] == 2 and r["store_side"] == 8 and r["samples_per_s"] > 0
