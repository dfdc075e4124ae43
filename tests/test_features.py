"""Features f^l = mean_t norm(h^l): the definition, the file format, slices, shards, checkpoints, bad input.

Tiny models (2 blocks, d=32, 8x8 images) on a few hundred made-up images; tools run in-process
through their ``main(argv)`` except where a subprocess is the point.
"""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from igpt_ds.checkpoint.consolidated import save_consolidated
from igpt_ds.config import get_preset
from igpt_ds.evaluate import features as F
from igpt_ds.model.transformer import IGPTModel
from igpt_ds.parallel.weights import full_state_dict

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(resolution=8, n_layer=2, d_model=32, n_head=2)


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def make_palette(seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (512, 3)).astype(np.float32)


def make_images(path, n=60, side=12, seed=0, classes=3):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    images = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    np.savez(path, images=images, labels=labels)
    return images, labels


def make_checkpoint(path, palette=None, seed=0, **overrides):
    cfg = get_preset("igpt-tiny", **{**TINY, **overrides})
    model = IGPTModel(cfg, seed=seed)
    save_consolidated(path, cfg, full_state_dict(model), palette=palette)
    return model.eval(), cfg


def direct_features(model, tokens, mask=None):
    """mean over positions of norm(h^l), written out by hand from model.hidden_states."""
    cfg = model.cfg
    out = []
    with torch.no_grad():
        for h in model.hidden_states(tokens, mask):
            h = h.double()
            if cfg.norm == "rmsnorm":
                n = h / torch.sqrt((h * h).mean(-1, keepdim=True) + cfg.norm_eps)
            else:
                c = h - h.mean(-1, keepdim=True)
                n = c / torch.sqrt((c * c).mean(-1, keepdim=True) + cfg.norm_eps)
            out.append(n.mean(1))
    return out


# ---------------------------------------------------------------------------------------------
# The definition
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_feature_equals_mean_of_norm_of_hidden_state(norm):
    cfg = get_preset("igpt-tiny", **TINY, norm=norm)
    model = IGPTModel(cfg, seed=1).eval()
    with torch.no_grad():  # learned gains and biases must not enter the features: make them non-trivial
        for name, p in model.named_parameters():
            if ".ln_" in name:
                p.uniform_(0.5, 2.0)
    tokens = torch.randint(0, 512, (3, cfg.seq_len), generator=torch.Generator().manual_seed(0))
    want = direct_features(model, tokens)
    got = F.pooled_features(model, tokens, list(range(cfg.n_layer + 1)))
    for layer in range(cfg.n_layer + 1):
        assert got[layer].dtype == torch.float32 and got[layer].shape == (3, cfg.d_model)
        torch.testing.assert_close(got[layer].double(), want[layer], atol=1e-5, rtol=1e-5)
    # Only the requested layers, computed up to the deepest of them.
    assert sorted(F.pooled_features(model, tokens, [1]).keys()) == [1]


def test_bert_features_average_fresh_masks_independent_of_batching():
    cfg = get_preset("igpt-tiny", **TINY, objective="bert")
    model = IGPTModel(cfg, seed=2).eval()
    tokens = torch.randint(0, 512, (4, cfg.seq_len), generator=torch.Generator().manual_seed(1))
    index = [10, 11, 12, 13]
    got = F.batch_features(model, tokens, [0, 2], index, bert_masks=3, seed=5)
    masks = F.image_masks(index, 3, cfg.seq_len, cfg.bert_mask_prob, seed=5)  # [3, b, s]
    assert masks.any(-1).all() and not torch.equal(masks[0], masks[1])  # a fresh mask per pass
    per_pass = [direct_features(model, tokens, masks[k]) for k in range(3)]
    for layer in (0, 2):
        want = sum(p[layer] for p in per_pass) / 3
        torch.testing.assert_close(got[layer].double(), want, atol=1e-5, rtol=1e-5)
    # Image 12's features do not depend on which batch it sits in.
    alone = F.batch_features(model, tokens[2:3], [2], [12], bert_masks=3, seed=5)
    torch.testing.assert_close(alone[2][0], got[2][2], atol=1e-6, rtol=1e-6)
    # bert_masks=0: the unmasked image.
    plain = F.batch_features(model, tokens, [2], index, bert_masks=0)
    torch.testing.assert_close(plain[2].double(), direct_features(model, tokens)[2], atol=1e-5, rtol=1e-5)


def test_parse_layers():
    assert F.parse_layers("all", 4) == [0, 1, 2, 3, 4]
    assert F.parse_layers("middle", 4) == [2]
    assert F.parse_layers("3", 4) == [3]
    assert F.parse_layers("1-3", 4) == [1, 2, 3]
    assert F.parse_layers("4,0,2,2", 4) == [0, 2, 4]
    assert F.parse_layers("0-1,3", 4) == [0, 1, 3]
    for bad, needle in [("5", "valid layers are 0..4"), ("2-9", "outside the model"), ("3-1", "backwards"),
                        ("x", "cannot read"), ("-1", "cannot read"), ("", "cannot read")]:
        with pytest.raises(ValueError, match=needle):
            F.parse_layers(bad, 4)


def test_writer_is_atomic_and_cleans_up(tmp_path):
    out = tmp_path / "f.npz"
    with pytest.raises(RuntimeError, match="boom"):
        with F.FeatureWriter(out, {"layer0": ((4, 2), np.float32)}) as w:
            w.write(0, {"layer0": np.ones((2, 2), np.float32)})
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # no output, no temporary directory
    with F.FeatureWriter(out, {"layer0": ((4, 2), np.float32)}) as w:
        w.write(0, {"layer0": np.ones((2, 2), np.float32)})
        with pytest.raises(RuntimeError, match="never written"):
            w.finish({})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# The tool
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("feat")
    palette = make_palette()
    images, labels = make_images(tmp / "images.npz", n=60)
    model, cfg = make_checkpoint(tmp / "ckpt", palette)
    return {"tmp": tmp, "palette": palette, "images": images, "labels": labels, "model": model, "cfg": cfg,
            "tool": load_tool("extract_features")}


def run_tool(setup, *argv):
    return setup["tool"].main([*map(str, argv), "--no-progress", "--num-workers", "0"])


def test_extract_matches_direct_computation(setup, tmp_path):
    from igpt_ds.data.shards import resize_view
    from igpt_ds.palette import quantize

    out = tmp_path / "f.npz"
    assert run_tool(setup, "--checkpoint", setup["tmp"] / "ckpt", "--data", setup["tmp"] / "images.npz",
                    "--layers", "0,2", "--out", out, "--batch-size", 16) == 0
    with F.FeatureFile(out) as f:
        assert f.layers == [0, 2] and f.num_rows == 60
        np.testing.assert_array_equal(f.labels(), setup["labels"])
        np.testing.assert_array_equal(f.index(), np.arange(60))
        assert f.meta["format"] == F.FORMAT and f.meta["kind"] == "model" and f.meta["layers"] == [0, 2]
        assert "parameter-free layernorm" in f.meta["norm"]
        resized = np.stack([resize_view(im, 8) for im in setup["images"]])
        tokens = torch.as_tensor(quantize(resized, setup["palette"]))
        want = direct_features(setup["model"], tokens)
        for layer in (0, 2):
            assert f.layer(layer).dtype == np.float32 and f.layer(layer).shape == (60, 32)
            np.testing.assert_allclose(f.layer(layer), want[layer].numpy(), atol=1e-5)
    # np.load reads the same file.
    with np.load(out) as z:
        assert {"layer0", "layer2", "labels", "index", "meta"} <= set(z.files)
    assert [p.name for p in tmp_path.iterdir()] == ["f.npz"]  # no temporary leftovers


def test_sharded_extraction_merges_to_single_process(setup, tmp_path):
    common = ["--checkpoint", setup["tmp"] / "ckpt", "--data", setup["tmp"] / "images.npz", "--layers", "all",
              "--batch-size", 8, "--dtype-out", "float16"]
    assert run_tool(setup, *common, "--out", tmp_path / "single.npz") == 0
    for i in (1, 0):  # order of finishing does not matter
        assert run_tool(setup, *common, "--out", tmp_path / "merged.npz", "--shard-index", i, "--num-shards", 2) == 0
    parts = sorted(p.name for p in tmp_path.glob("merged.part*"))
    assert parts == ["merged.part00000-of-00002.npz", "merged.part00001-of-00002.npz"]
    with F.FeatureFile(tmp_path / parts[0]) as part:
        assert part.num_rows == 30 and part.meta["slice"] == {"shard_index": 0, "num_shards": 2, "start": 0, "end": 30}
    tool = setup["tool"]
    assert tool.main(["merge", str(tmp_path / "merged.npz")]) == 0
    with F.FeatureFile(tmp_path / "single.npz") as a, F.FeatureFile(tmp_path / "merged.npz") as b:
        assert a.layers == b.layers == [0, 1, 2]
        for layer in a.layers:
            assert b.layer(layer).dtype == np.float16
            np.testing.assert_array_equal(a.layer(layer), b.layer(layer))
        np.testing.assert_array_equal(a.labels(), b.labels())
        np.testing.assert_array_equal(b.index(), np.arange(60))
        assert "slice" not in b.meta and b.meta["merged_from"] == 2
    # A missing slice is refused.
    with pytest.raises(F.FeatureFileError, match="exactly once"):
        F.merge_feature_files([tmp_path / parts[1]], tmp_path / "bad.npz")


def test_shards_give_the_same_features_as_images(setup, tmp_path):
    from igpt_ds.data.shards import BuildSettings, build_shards
    from igpt_ds.data.sources import open_source
    from igpt_ds.data.tokens import read_shard, resolve_source

    source = open_source(str(setup["tmp"] / "images.npz"), "train")
    build_shards(source, str(tmp_path / "shards"), setup["palette"], BuildSettings(resolution=8, shard_size=25),
                 progress=False, log=lambda s: None)
    ckpt = setup["tmp"] / "ckpt"
    assert run_tool(setup, "--checkpoint", ckpt, "--shards", tmp_path / "shards", "--out", tmp_path / "s.npz",
                    "--layers", "1", "--batch-size", 7, "--shard-index", 1, "--num-shards", 2) == 0
    assert run_tool(setup, "--checkpoint", ckpt, "--shards", tmp_path / "shards", "--out", tmp_path / "s.npz",
                    "--layers", "1", "--batch-size", 7, "--shard-index", 0, "--num-shards", 2) == 0
    assert setup["tool"].main(["--merge", "--out", str(tmp_path / "s.npz")]) == 0
    assert run_tool(setup, "--checkpoint", ckpt, "--data", setup["tmp"] / "images.npz", "--out",
                    tmp_path / "d.npz", "--layers", "1") == 0
    specs, _ = resolve_source(str(tmp_path / "shards"))
    order = [int(key.split("_")[-2]) for spec in specs for key, _, _ in read_shard(spec, 0, spec.samples, 64, 512)]
    with F.FeatureFile(tmp_path / "s.npz") as s, F.FeatureFile(tmp_path / "d.npz") as d:
        np.testing.assert_allclose(s.layer(1), d.layer(1)[order], atol=1e-6)
        np.testing.assert_array_equal(s.labels(), d.labels()[order])
    # Shards from another palette are refused.
    other = open_source(str(setup["tmp"] / "images.npz"), "train")
    build_shards(other, str(tmp_path / "other"), make_palette(9), BuildSettings(resolution=8, shard_size=60),
                 progress=False, log=lambda s: None)
    assert run_tool(setup, "--checkpoint", ckpt, "--shards", tmp_path / "other", "--out", tmp_path / "x.npz") == 2


def test_baselines_raw_pixels_and_random_init(setup, tmp_path):
    ckpt, data = setup["tmp"] / "ckpt", setup["tmp"] / "images.npz"
    assert run_tool(setup, "--checkpoint", ckpt, "--data", data, "--raw-pixels", "--out", tmp_path / "raw.npz") == 0
    with F.FeatureFile(tmp_path / "raw.npz") as f:
        assert f.layers == [0] and f.width(0) == 8 * 8 * 3 and f.meta["kind"] == "raw-pixels"
        first = f.layer(0)[0].reshape(64, 3)
        assert np.isin(first, setup["palette"]).all()  # palette colours
    assert run_tool(setup, "--checkpoint", ckpt, "--data", data, "--random-init", "--seed", 7,
                    "--out", tmp_path / "rand.npz") == 0
    assert run_tool(setup, "--checkpoint", ckpt, "--data", data, "--out", tmp_path / "model.npz") == 0
    with F.FeatureFile(tmp_path / "rand.npz") as r, F.FeatureFile(tmp_path / "model.npz") as m:
        assert r.layers == m.layers and r.meta["kind"] == "random-init" and r.meta["model"] == m.meta["model"]
        assert not np.allclose(r.layer(2), m.layer(2))
    # Without a checkpoint: a preset, its resolution and a palette.
    np.save(tmp_path / "pal.npy", setup["palette"])
    assert run_tool(setup, "--model", "igpt-tiny", "--resolution", 8, "--random-init", "--palette",
                    tmp_path / "pal.npy", "--data", data, "--layers", "middle", "--out", tmp_path / "r2.npz") == 0
    with F.FeatureFile(tmp_path / "r2.npz") as f:
        assert f.layers == [2] and f.width(2) == 128


def test_bad_inputs(setup, tmp_path, capsys):
    data = setup["tmp"] / "images.npz"
    # A checkpoint and a palette that do not belong together.
    np.save(tmp_path / "other.npy", make_palette(3))
    assert run_tool(setup, "--checkpoint", setup["tmp"] / "ckpt", "--palette", tmp_path / "other.npy",
                    "--data", data, "--out", tmp_path / "x.npz") == 2
    assert "is not the palette" in capsys.readouterr().err
    # A checkpoint without a palette needs --palette; with one it records a hash, checked.
    cfg = setup["cfg"]
    save_consolidated(tmp_path / "bare", cfg, full_state_dict(setup["model"]))
    assert run_tool(setup, "--checkpoint", tmp_path / "bare", "--data", data, "--out", tmp_path / "x.npz") == 2
    assert "carries no palette; pass --palette" in capsys.readouterr().err
    meta = json.loads((tmp_path / "bare" / "config.json").read_text())
    from igpt_ds.palette import palette_sha256

    meta["palette_sha256"] = palette_sha256(setup["palette"])
    (tmp_path / "bare" / "config.json").write_text(json.dumps(meta))
    assert run_tool(setup, "--checkpoint", tmp_path / "bare", "--palette", tmp_path / "other.npy",
                    "--data", data, "--out", tmp_path / "x.npz") == 2
    assert "is not the palette" in capsys.readouterr().err
    np.save(tmp_path / "right.npy", setup["palette"])
    assert run_tool(setup, "--checkpoint", tmp_path / "bare", "--palette", tmp_path / "right.npy",
                    "--data", data, "--layers", "0", "--out", tmp_path / "ok.npz") == 0
    # A layer outside the model.
    assert run_tool(setup, "--checkpoint", setup["tmp"] / "ckpt", "--data", data, "--layers", "3",
                    "--out", tmp_path / "x.npz") == 2
    assert "valid layers are 0..2" in capsys.readouterr().err
    # Bad slice, fp16 on CPU, no data.
    assert run_tool(setup, "--checkpoint", setup["tmp"] / "ckpt", "--data", data, "--out", tmp_path / "x.npz",
                    "--shard-index", 2, "--num-shards", 2) == 2
    assert run_tool(setup, "--checkpoint", setup["tmp"] / "ckpt", "--data", data, "--out", tmp_path / "x.npz",
                    "--dtype", "fp16", "--device", "cpu") == 2
    with pytest.raises(SystemExit):
        run_tool(setup, "--checkpoint", setup["tmp"] / "ckpt", "--out", tmp_path / "x.npz")
    assert not (tmp_path / "x.npz").exists()
    # Not a feature file.
    (tmp_path / "junk.npz").write_text("junk")
    with pytest.raises(F.FeatureFileError, match="not an .npz"):
        F.FeatureFile(tmp_path / "junk.npz")
    np.savez(tmp_path / "nolayers.npz", labels=np.zeros(3))
    with pytest.raises(F.FeatureFileError, match="no layer"):
        F.FeatureFile(tmp_path / "nolayers.npz")


# ---------------------------------------------------------------------------------------------
# DeepSpeed checkpoints (TP=2, ZeRO-3) give the features of the same model consolidated
# ---------------------------------------------------------------------------------------------

def _has_deepspeed_format() -> bool:
    from igpt_ds.checkpoint import formats as pretrained

    return any(fmt.name == "deepspeed" for fmt in pretrained.FORMATS)


def _pretrain(tmp, name, nprocs, stage, flags=()):
    from igpt_ds.testing import launch

    cfg = tmp / f"{name}.json"
    cfg.write_text(json.dumps({"train_batch_size": 8, "zero_optimization": {"stage": stage}}))
    run = tmp / name
    results = launch([str(ROOT / "igpt_ds" / "pretrain.py"), "--resolution", "8", "--train-steps", "2",
                      "--no-progress", "--num-workers", "0", "--deepspeed_config", str(cfg), "--save", str(run),
                      *flags], nprocs, timeout=300, cwd=str(ROOT), env={"DS_ACCELERATOR": "cpu"})
    for rank, r in enumerate(results):
        assert r.returncode == 0, f"{name} rank {rank}:\n{r.stderr[-3000:]}"
    return run


needs_deepspeed_format = pytest.mark.skipif(
    not _has_deepspeed_format(),
    reason="load_pretrained has no 'deepspeed' format yet (igpt_ds.checkpoint.formats.FORMATS)")


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    return _pretrain(tmp_path_factory.mktemp("ds_single"), "single", 1, 0)


@needs_deepspeed_format
@pytest.mark.parametrize("name, stage, flags", [("tp2", 1, ["--tensor-parallel", "2"]), ("zero3", 3, [])])
def test_deepspeed_checkpoint_features_equal_consolidated(setup, tmp_path_factory, single_process_run,
                                                          name, stage, flags):
    from igpt_ds.checkpoint.formats import read_checkpoint, write_checkpoint

    tmp = tmp_path_factory.mktemp(f"ds_{name}")
    run = _pretrain(tmp, name, 2, stage, flags)
    config, sd, palette, fmt = read_checkpoint(run)
    assert fmt.name == "deepspeed"
    write_checkpoint(tmp / "export", "consolidated", config, sd, palette=palette)
    np.save(tmp / "pal.npy", setup["palette"])
    common = ["--data", setup["tmp"] / "images.npz", "--palette", tmp / "pal.npy", "--layers", "all"]
    assert run_tool(setup, "--checkpoint", run, *common, "--out", tmp / "ds.npz") == 0
    assert run_tool(setup, "--checkpoint", tmp / "export", *common, "--out", tmp / "export.npz") == 0
    # The same training in one process (layouts only reorder fp32 sums).
    assert run_tool(setup, "--checkpoint", single_process_run, *common, "--out", tmp / "single.npz") == 0
    with F.FeatureFile(tmp / "ds.npz") as a, F.FeatureFile(tmp / "export.npz") as b, \
            F.FeatureFile(tmp / "single.npz") as c:
        assert a.layers == b.layers == c.layers == list(range(config.n_layer + 1))
        for layer in a.layers:
            np.testing.assert_array_equal(a.layer(layer), b.layer(layer))
            np.testing.assert_allclose(a.layer(layer), c.layer(layer), atol=1e-4)


def test_run_on_shards_without_palette_carries_the_manifest_palette(setup, tmp_path):
    # The shards' dataset.json carries the palette: the run's palette.npy, its checkpoint and its export
    # carry it, and features are extracted without --palette.
    from testdata import tiny_shards

    from igpt_ds.checkpoint.run import read_checkpoint_meta
    from igpt_ds.data.shards import read_manifest
    from igpt_ds.palette import load_palette, palette_sha256
    from igpt_ds.testing import launch

    shards = tiny_shards(tmp_path)
    manifest = read_manifest(shards)
    run = _pretrain(tmp_path, "run", 1, 0, ["--train-data", str(shards)])
    assert load_palette(run / "palette.npy").tobytes() == manifest.palette.tobytes()
    assert read_checkpoint_meta(str(run))[1]["palette_sha256"] == manifest.palette_sha256
    assert load_tool("convert_checkpoint").main([str(run), str(tmp_path / "export"), "--to", "consolidated"]) == 0
    assert palette_sha256(load_palette(tmp_path / "export" / "palette.npy")) == manifest.palette_sha256
    for checkpoint in (run, tmp_path / "export"):
        out = tmp_path / f"{checkpoint.name}.npz"
        assert run_tool(setup, "--checkpoint", checkpoint, "--data", tmp_path / "d.npz", "--layers", "1",
                        "--out", out) == 0
        with F.FeatureFile(out) as f:
            assert f.num_rows == 96 and f.meta["palette_sha256"] == manifest.palette_sha256
    # --raw-pixels of shards needs no --palette either: the manifest's turns tokens into colours.
    assert run_tool(setup, "--model", "igpt-tiny", "--resolution", 8, "--raw-pixels", "--shards", shards,
                    "--out", tmp_path / "raw.npz") == 0
    with F.FeatureFile(tmp_path / "raw.npz") as f:
        assert np.isin(f.layer(0)[0], manifest.palette).all() and f.meta["palette_from"] == "the shards' dataset.json"
    # --palette is still checked against the shards' hash.
    np.save(tmp_path / "other.npy", make_palette(3))
    bad = launch([str(ROOT / "igpt_ds" / "pretrain.py"), "--resolution", "8", "--train-steps", "1", "--no-progress",
                  "--num-workers", "0", "--deepspeed_config", str(tmp_path / "run.json"), "--save",
                  str(tmp_path / "bad"), "--train-data", str(shards), "--palette", str(tmp_path / "other.npy")],
                 1, timeout=300, cwd=str(ROOT), env={"DS_ACCELERATOR": "cpu"})[0]
    assert bad.returncode != 0 and "quantized with palette sha256" in bad.stderr


# ---------------------------------------------------------------------------------------------
# BERT: the paper's evaluation (Sec. 4.6), single mask / vote members / average
# ---------------------------------------------------------------------------------------------

def test_mask_k_of_an_image_does_not_depend_on_the_number_of_masks():
    seq_len, prob = 64, 0.15
    five = F.image_masks([3, 40], 5, seq_len, prob, seed=7)  # [5, 2, s]
    for k in range(5):
        np.testing.assert_array_equal(F.image_masks([3, 40], k + 1, seq_len, prob, seed=7)[k], five[k])
        np.testing.assert_array_equal(F.image_masks([40], k + 1, seq_len, prob, seed=7)[k, 0], five[k, 1])
    assert not torch.equal(five[0], five[1])
    assert not torch.equal(F.image_masks([3], 1, seq_len, prob, seed=8)[0], five[0, :1])  # the seed matters


@pytest.fixture(scope="module")
def bert_setup(setup):
    tmp = setup["tmp"]
    make_checkpoint(tmp / "bert", setup["palette"], seed=4, objective="bert")
    return {**setup, "ckpt": tmp / "bert"}


def test_bert_vote_file_holds_single_mask_features_and_every_mask(bert_setup, tmp_path):
    s = bert_setup
    common = ["--checkpoint", s["ckpt"], "--data", s["tmp"] / "images.npz", "--layers", "0,2", "--seed", 3]
    assert run_tool(s, *common, "--bert-masks", 3, "--bert-eval", "vote", "--batch-size", 16,
                    "--out", tmp_path / "vote.npz") == 0
    assert run_tool(s, *common, "--bert-masks", 1, "--batch-size", 7, "--out", tmp_path / "one.npz") == 0
    assert run_tool(s, *common, "--bert-masks", 3, "--batch-size", 9, "--out", tmp_path / "avg.npz") == 0
    with F.FeatureFile(tmp_path / "vote.npz") as vote, F.FeatureFile(tmp_path / "one.npz") as one, \
            F.FeatureFile(tmp_path / "avg.npz") as avg, np.load(tmp_path / "vote.npz") as z:
        assert vote.layers == [0, 2]  # readers of layer<l> alone see the single-mask features
        assert vote.meta["bert_eval"] == "vote" and vote.meta["bert_masks"] == 3
        assert avg.meta["bert_eval"] == "average" and one.meta["bert_masks"] == 1
        assert sorted(k for k in z.files if k.startswith("layer")) == \
            ["layer0", "layer0_mask1", "layer0_mask2", "layer2", "layer2_mask1", "layer2_mask2"]
        for layer in (0, 2):
            members = [z[F.feature_key(layer, k)] for k in range(3)]
            assert all(m.shape == (60, 32) and m.dtype == np.float32 for m in members)
            # Mask 0 is exactly the single-mask extraction (another batch size, the same seed).
            np.testing.assert_array_equal(members[0], one.layer(layer))
            for a in range(3):
                for b in range(a + 1, 3):
                    assert np.abs(members[a] - members[b]).max() > 1e-3  # fresh masks, other features
            # The average file is the mean of the members; both sum float32 in mask order (1e-6: rounding).
            np.testing.assert_allclose(avg.layer(layer), (members[0] + members[1] + members[2]) / 3,
                                       atol=1e-6, rtol=0)


def test_bert_vote_slices_merge_to_the_one_process_file(bert_setup, tmp_path):
    s = bert_setup
    common = ["--checkpoint", s["ckpt"], "--data", s["tmp"] / "images.npz", "--layers", "1",
              "--bert-masks", 2, "--bert-eval", "vote", "--batch-size", 8]
    assert run_tool(s, *common, "--out", tmp_path / "single.npz") == 0
    for i in (0, 1):
        assert run_tool(s, *common, "--out", tmp_path / "m.npz", "--shard-index", i, "--num-shards", 2) == 0
    assert s["tool"].main(["merge", str(tmp_path / "m.npz")]) == 0
    with np.load(tmp_path / "single.npz") as a, np.load(tmp_path / "m.npz") as b:
        names = sorted(k for k in a.files if k != "meta")
        assert names == sorted(k for k in b.files if k != "meta") == ["index", "labels", "layer1", "layer1_mask1"]
        for name in names:
            np.testing.assert_array_equal(a[name], b[name])
    with F.FeatureFile(tmp_path / "m.npz") as f:
        assert f.meta["bert_eval"] == "vote" and f.meta["merged_from"] == 2


def test_bert_eval_bad_inputs(bert_setup, tmp_path, capsys):
    s = bert_setup
    data = s["tmp"] / "images.npz"
    with pytest.raises(SystemExit):  # a vote over one mask is the single-mask file
        run_tool(s, "--checkpoint", s["ckpt"], "--data", data, "--bert-eval", "vote", "--bert-masks", 1,
                 "--out", tmp_path / "x.npz")
    assert "--bert-eval vote needs --bert-masks >= 2" in capsys.readouterr().err
    assert run_tool(s, "--checkpoint", s["tmp"] / "ckpt", "--data", data, "--bert-eval", "vote",
                    "--out", tmp_path / "x.npz") == 2
    assert "needs a BERT model" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()
    # AR models record no BERT evaluation, as before.
    assert run_tool(s, "--checkpoint", s["tmp"] / "ckpt", "--data", data, "--layers", "0",
                    "--out", tmp_path / "ar.npz") == 0
    with F.FeatureFile(tmp_path / "ar.npz") as f:
        assert f.meta["bert_eval"] is None and f.meta["bert_masks"] is None
