"""tools/extract_features.py at ImageNet size: auto defaults, the disk check, JPEG decoders, shard crops.

ImageNet-sized behaviour is triggered on 60 tiny images by lowering ``F.IMAGENET_SIZED`` (the one
threshold both ``auto`` defaults read); free disk space is faked through ``shutil.disk_usage``.
"""
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from igpt_ds.checkpoint.consolidated import save_consolidated
from igpt_ds.config import get_preset
from igpt_ds.evaluate import features as F
from igpt_ds.model.transformer import IGPTModel
from igpt_ds.parallel.weights import full_state_dict

ROOT = Path(__file__).resolve().parents[1]
N_LAYER = 4  # middle half = layers 1..3 of 0..4, a proper subset
TINY = dict(resolution=8, n_layer=N_LAYER, d_model=32, n_head=2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    palette = rng.uniform(-1, 1, (512, 3)).astype(np.float32)
    images, labels = rng.integers(0, 256, (60, 12, 12, 3), dtype=np.uint8), np.arange(60) % 3
    np.savez(tmp / "images.npz", images=images, labels=labels)
    # The same kind of data as an ImageNet-layout folder of JPEGs (class sub-folders).
    for i, (image, label) in enumerate(zip(images, labels)):
        (tmp / "jpegs" / f"c{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).resize((40, 30)).save(tmp / "jpegs" / f"c{label}" / f"{i:03d}.jpg", quality=90)
    cfg = get_preset("igpt-tiny", **TINY)
    save_consolidated(tmp / "ckpt", cfg, full_state_dict(IGPTModel(cfg, seed=0)), palette=palette)
    spec = importlib.util.spec_from_file_location("tool_extract_features_imagenet",
                                                  ROOT / "tools" / "extract_features.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return {"tmp": tmp, "palette": palette, "tool": tool, "ckpt": tmp / "ckpt", "data": tmp / "images.npz"}


def run_tool(setup, *argv, workers=0):
    return setup["tool"].main([*map(str, argv), "--no-progress", "--num-workers", str(workers)])


# ---------------------------------------------------------------------------------------------
# auto: --layers and --dtype-out
# ---------------------------------------------------------------------------------------------

def test_auto_choices():
    assert F.resolve_layers("auto", 48, 99_999)[0] == list(range(49))
    layers, why = F.resolve_layers("auto", 48, 1_281_167)
    assert layers == list(range(12, 37)) and "middle half" in why  # iGPT-L on ImageNet
    assert F.resolve_layers("auto", 60, F.IMAGENET_SIZED)[0] == list(range(15, 46))
    assert F.resolve_layers("0,5", 48, 1_281_167)[0] == [0, 5]  # an explicit choice is kept
    with pytest.raises(ValueError, match="valid layers"):
        F.resolve_layers("49", 48, 10)
    assert F.resolve_dtype_out("auto", 50_000, 49 * 1536)[0] == "float32"   # CIFAR, iGPT-L: 14 GiB
    assert F.resolve_dtype_out("auto", 100_000, 512)[0] == "float16"        # ImageNet-sized
    dtype, why = F.resolve_dtype_out("auto", 50_000, 61 * 3072)             # CIFAR, iGPT-XL: 36 GiB
    assert dtype == "float16" and "16.0 GiB" in why
    assert F.resolve_dtype_out("float32", 10**7, 10**4)[0] == "float32"
    with pytest.raises(ValueError, match="choose auto"):
        F.resolve_dtype_out("float64", 10, 10)


def test_auto_defaults_small_and_imagenet_sized(setup, tmp_path, monkeypatch, capsys):
    assert run_tool(setup, "--checkpoint", setup["ckpt"], "--data", setup["data"], "--out", tmp_path / "small.npz") == 0
    with F.FeatureFile(tmp_path / "small.npz") as f:
        assert f.layers == list(range(N_LAYER + 1)) and f.meta["dtype"] == "float32"
        assert f.layer(0).dtype == np.float32
    monkeypatch.setattr(F, "IMAGENET_SIZED", 60)  # these 60 images now count as ImageNet-sized
    out = tmp_path / "big.npz"
    assert run_tool(setup, "--checkpoint", setup["ckpt"], "--data", setup["data"], "--out", out) == 0
    printed = capsys.readouterr().out
    assert "layers 1..3 (auto: the middle half of 0..4" in printed and "float16 (auto: the source holds 60" in printed
    with F.FeatureFile(out) as f:
        assert f.layers == [1, 2, 3] and f.meta["layers"] == [1, 2, 3] and f.meta["dtype"] == "float16"
        assert f.layer(2).dtype == np.float16
        # The same features as a float32 extraction of every layer, rounded to float16.
        with F.FeatureFile(tmp_path / "small.npz") as small:
            np.testing.assert_array_equal(f.layer(2), small.layer(2).astype(np.float16))
    # The meta holds the resolved values: the explicit equivalent is the same extraction, kept.
    assert run_tool(setup, "--checkpoint", setup["ckpt"], "--data", setup["data"], "--out", out,
                    "--layers", "1-3", "--dtype-out", "float16") == 0
    assert f"kept {out}" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# The disk check
# ---------------------------------------------------------------------------------------------

def test_projected_size_is_the_file_size(setup, tmp_path, capsys):
    out = tmp_path / "f.npz"
    assert run_tool(setup, "--checkpoint", setup["ckpt"], "--data", setup["data"], "--layers", "0,3",
                    "--dtype-out", "float16", "--out", out) == 0
    ex = F.Extraction(layers=[0, 3], widths={0: 32, 3: 32}, total=60, start=0, end=60, meta={})
    file_bytes, largest = ex.projected_bytes("float16")
    assert largest == 60 * 32 * 2  # a layer: 60 rows x 32 x float16
    actual = os.path.getsize(out)
    assert actual <= file_bytes <= actual + 4096 * 5  # arrays exact, headers bounded
    assert f"= {F.human_bytes(file_bytes)}; needs {F.human_bytes(file_bytes + largest)}" in capsys.readouterr().out


def test_not_enough_disk_is_refused_before_any_work(setup, tmp_path, monkeypatch, capsys):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=20_000))
    started = []
    monkeypatch.setattr(F, "source_batches", lambda *a, **k: started.append(1) or iter(()))
    out = tmp_path / "sub" / "f.npz"
    assert run_tool(setup, "--checkpoint", setup["ckpt"], "--data", setup["data"], "--out", out) == 2
    err = capsys.readouterr().err
    assert f"{out}: the features need" in err and "19.5 KiB free" in err and str(tmp_path) in err
    for fix in ("--dtype-out float16", "fewer --layers", "--out on a disk with more free space"):
        assert fix in err
    assert not started and not (tmp_path / "sub").exists()  # no data read, nothing written
    # float16 already: the advice does not repeat it; a vote file also suggests averaging.
    with pytest.raises(ValueError) as e:
        F.check_free_space(out, 10_000, 2_000, 11_999, "float16", masks=5)
    assert "--dtype-out" not in str(e.value) and "--bert-eval average" in str(e.value)
    assert F.check_free_space(out, 10_000, 2_000, 12_000, "float32") == 12_000


# ---------------------------------------------------------------------------------------------
# JPEG decoders
# ---------------------------------------------------------------------------------------------

def test_jpeg_folder_with_workers_equals_in_process_decoding(setup, tmp_path, capsys):
    common = ["--checkpoint", setup["ckpt"], "--data", setup["tmp"] / "jpegs", "--layers", "2", "--batch-size", 8]
    assert run_tool(setup, *common, "--out", tmp_path / "w0.npz", workers=0) == 0
    assert run_tool(setup, *common, "--out", tmp_path / "w2.npz", workers=2) == 0
    assert "2 decoding workers" in capsys.readouterr().out
    with F.FeatureFile(tmp_path / "w0.npz") as a, F.FeatureFile(tmp_path / "w2.npz") as b:
        assert a.num_rows == 60
        np.testing.assert_array_equal(a.layer(2), b.layer(2))
        np.testing.assert_array_equal(a.labels(), b.labels())


def test_default_num_workers(setup, monkeypatch):
    tool = setup["tool"]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert tool.default_num_workers() == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert tool.default_num_workers() == 2
    args = tool.parse_args(["--checkpoint", "c", "--data", "d", "--out", "o.npz"])
    assert args.num_workers is None and args.layers == "auto" and args.dtype_out == "auto"


def test_decode_benchmark_measures_the_extractor_data_path(setup, tmp_path):
    from igpt_ds.data.sources import open_source
    from igpt_ds.planning.bench_data import decode_throughput, extraction_consumption, write_jpeg_folder

    assert write_jpeg_folder(open_source(str(setup["data"])), str(tmp_path / "j"), 20, side=48) == 20
    assert sorted(os.listdir(tmp_path / "j")) == ["class0000", "class0001", "class0002"]
    with Image.open(next((tmp_path / "j" / "class0000").iterdir())) as im:
        assert im.format == "JPEG" and im.size == (48, 48)
    for quantize_too in (False, True):
        m = decode_throughput(str(tmp_path / "j"), setup["palette"], 8, 1, batch_size=4, quantize_too=quantize_too)
        assert m["images"] == 20 and m["images_per_s"] > 0 and m["cpu_ms_per_image"] > 0
    with pytest.raises(ValueError, match="one batch"):
        decode_throughput(str(tmp_path / "j"), setup["palette"], 8, 0, batch_size=20)
    # GPU side: forward FLOPs = 2N + 4·L·d·T per token, T tokens per image, one pass per BERT mask.
    cfg = get_preset("igpt-s")
    forward = 2 * cfg.num_parameters(include_embeddings=False) + 4 * cfg.n_layer * cfg.d_model * cfg.seq_len
    fp32, bf16 = extraction_consumption("igpt-s", "fp32"), extraction_consumption("igpt-s", "bf16", passes=5)
    assert fp32["flops_per_image"] == pytest.approx(forward * cfg.seq_len)
    assert fp32["images_per_s"] == pytest.approx(fp32["peak_flops"] * 0.5 / (forward * cfg.seq_len))
    assert bf16["images_per_s"] == pytest.approx(bf16["peak_flops"] * 0.5 / (5 * forward * cfg.seq_len))


# ---------------------------------------------------------------------------------------------
# Shards built with random crops
# ---------------------------------------------------------------------------------------------

def test_augmented_shards_are_refused_unless_allowed(setup, tmp_path, capsys):
    from igpt_ds.data.shards import BuildSettings, build_shards
    from igpt_ds.data.sources import open_source

    shards = tmp_path / "aug"
    build_shards(open_source(str(setup["data"])), str(shards), setup["palette"],
                 BuildSettings(resolution=8, shard_size=30, crop="random-resized", views=2),
                 progress=False, log=lambda s: None)
    args = ["--checkpoint", setup["ckpt"], "--shards", shards, "--layers", "1"]
    assert run_tool(setup, *args, "--out", tmp_path / "x.npz") == 2
    err = capsys.readouterr().err
    assert f"--shards {shards}" in err and "--crop random-resized (2 view(s) per image)" in err
    assert "tools/build_shards.py --crop center" in err and "--allow-augmented-shards" in err
    assert not (tmp_path / "x.npz").exists()
    assert run_tool(setup, *args, "--allow-augmented-shards", "--out", tmp_path / "x.npz") == 0
    with F.FeatureFile(tmp_path / "x.npz") as f:
        assert f.num_rows == 60  # one row per image: a sample's first view (its K views are one sample)


def test_decode_benchmark_target_writes_its_section(setup, tmp_path):
    spec = importlib.util.spec_from_file_location("tool_benchmark_decode", ROOT / "tools" / "benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    np.save(tmp_path / "pal.npy", setup["palette"])
    md = tmp_path / "B.md"
    bench.main(["--markdown", str(md), "decode", "--data", str(setup["data"]), "--images", "24", "--side", "32", "48",
                "--resolution", "8", "--workers", "0", "1", "--rounds", "1", "--batch-size", "4",
                "--palette", str(tmp_path / "pal.npy"), "--presets", "igpt-s", "igpt-xl", "--scratch", str(tmp_path)])
    text = md.read_text()
    assert "## Feature extraction decoders" in text and "<!-- benchmark:decode:end -->" in text
    rows = [line for line in text.splitlines() if line.startswith(("| 32²", "| 48²"))]
    assert len(rows) == 4 and all(line.split("|")[2].strip() == "8²" for line in rows)  # 2 sides x 2 worker counts
    from igpt_ds.planning.bench_data import extraction_consumption

    gflop = extraction_consumption("igpt-s", "fp32")["flops_per_image"] / 1e9
    assert f"| igpt-s | 32² | {gflop:,.0f} |" in text and "| igpt-xl | 64² |" in text
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("igpt-bench")] == []  # JPEGs cleaned up
