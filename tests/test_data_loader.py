"""The streaming loader: round trip, DP/TP split, equal batch counts, resume, bad input."""
import collections
import itertools
import json
import os

import numpy as np
import pytest

from igpt_ds.data.images import ImageLoader
from igpt_ds.data.shards import BuildSettings, ShardError, _write_tar, build_shards, read_manifest
from igpt_ds.data.sources import open_source
from igpt_ds.data.tokens import EpochLayout, build_loader, epoch_segments
from igpt_ds.palette import palette_sha256, quantize
from igpt_ds.parallel import signals
from igpt_ds.parallel.layout import ParallelLayout
from igpt_ds.testing import run_ranks

RES = 8


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """48 labelled 8x8 images in shards of 10, 10, 10, 10, 8 samples."""
    root = tmp_path_factory.mktemp("data")
    imgs = np.random.default_rng(0).integers(0, 256, (48, RES, RES, 3), dtype=np.uint8)
    np.savez(root / "d.npz", images=imgs, labels=np.arange(48) % 5)
    pal = np.random.default_rng(1).uniform(-1, 1, (512, 3)).astype(np.float32)
    build_shards(open_source(root / "d.npz"), str(root / "shards"), pal,
                 BuildSettings(resolution=RES, shard_size=10), progress=False)
    expected = {f"d_{i:07d}_v0": (quantize(imgs[i:i + 1], pal)[0], i % 5) for i in range(48)}
    return root / "shards", pal, expected


def epoch_batches(loader):
    return [batch for _, batch in zip(range(loader.batches_per_epoch), loader)]


def test_round_trip_every_sample_once_across_2_dp_ranks_x_2_workers(dataset):
    shards, pal, expected = dataset
    seen = collections.Counter()
    for dp in range(2):
        loader = build_loader(str(shards), batch_size=4, dp_rank=dp, dp_world_size=2, num_workers=2, epochs=1,
                              expected_palette_sha256=palette_sha256(pal), expected_resolution=RES)
        batches = list(loader)
        assert len(batches) == loader.batches_per_epoch == 6 and loader.num_samples == 48
        for batch in batches:
            assert batch["tokens"].shape == (4, RES * RES) and batch["labels"].shape == (4,)
            for key, tokens, label in zip(batch["keys"], batch["tokens"], batch["labels"]):
                np.testing.assert_array_equal(tokens.numpy(), expected[key][0])
                assert int(label) == expected[key][1]
                seen[key] += 1
    assert seen == collections.Counter({k: 1 for k in expected})


def test_shuffle_changes_per_epoch_and_sources_agree(dataset):
    shards, _, expected = dataset
    loader = build_loader(str(shards), batch_size=6, dp_rank=0, dp_world_size=1, num_workers=0, epochs=2,
                          shuffle_buffer=16)
    keys = [k for b in loader for k in b["keys"]]
    assert sorted(keys[:48]) == sorted(keys[48:]) == sorted(expected) and keys[:48] != keys[48:]
    # The same shards by brace pattern (dataset.json beside it), by explicit list + manifest,
    # and through a user-given pipe: command.
    pattern = str(shards / "train-{000000..000004}.tar")
    pipes = [f"pipe:cat {p}" for p in read_manifest(shards).shard_paths()]
    for source, manifest in [(pattern, None), (pipes, str(shards / "dataset.json"))]:
        other = build_loader(source, batch_size=6, dp_rank=0, dp_world_size=1, num_workers=0, epochs=2,
                             shuffle_buffer=16, manifest=manifest)
        assert [k for b in other for k in b["keys"]] == keys
    with pytest.raises(ValueError, match="manifest="):
        build_loader(pipes, batch_size=6, dp_rank=0, dp_world_size=1)


@pytest.mark.parametrize("drop_last", [True, False])
def test_every_dp_rank_gets_the_same_number_of_batches(drop_last):
    for n, d, b, w in itertools.product([1, 7, 48, 50, 101], [1, 2, 3, 8], [1, 4, 5], [1, 2, 3]):
        layout = EpochLayout(n, d, b, drop_last)
        if layout.batches_per_epoch == 0:
            continue
        covered = []
        for rank in range(d):
            sizes = []
            for worker in range(w):
                start, stop = layout.worker_range(rank, worker, w)
                covered += [p % n for p in range(start, stop)]
                sizes.append(stop - start)
            # Worker w's batches are w, w+W, ...: full ones, except the very last batch.
            assert sum(sizes) == layout.samples_per_rank
            assert sum(-(-s // b) for s in sizes) == layout.batches_per_epoch
        counts = collections.Counter(covered)
        if drop_last:
            assert max(counts.values()) == 1 and len(counts) == d * layout.samples_per_rank
        else:
            assert len(counts) == n and len(covered) - n < d  # every sample, padding < D
        segments = epoch_segments([10] * (n // 10) + [n % 10] * (n % 10 > 0), 0, 0, True, 0, n)
        assert sum(e - f for _, f, e in segments) == n


def _rank_batches(rank, world, shards, tp):
    import torch
    import torch.distributed as dist

    dp, _, _ = ParallelLayout(world, tensor_parallel=tp).coords(rank)
    # num_workers=0: run_ranks' processes are daemonic and may not start DataLoader workers.
    loader = build_loader(shards, batch_size=5, dp_rank=dp, dp_world_size=world // tp, num_workers=0, epochs=1)
    keys = []
    for batch in loader:  # a collective per step, as in training: unequal batch counts would hang
        step = torch.ones(1)
        dist.all_reduce(step)
        assert step.item() == world
        keys.append(batch["keys"])
    return dp, keys


def test_tp_ranks_share_batches_dp_replicas_are_disjoint(dataset):
    shards, _, _ = dataset
    results = run_ranks(_rank_batches, 4, str(shards), 2, timeout=120)  # TP=2 x DP=2
    assert [dp for dp, _ in results] == [0, 0, 1, 1]
    assert results[0][1] == results[1][1] and results[2][1] == results[3][1]
    replica0 = {k for batch in results[0][1] for k in batch}
    replica1 = {k for batch in results[2][1] for k in batch}
    assert len(results[0][1]) == len(results[2][1]) == 4  # 48 samples / 2 replicas / batch 5, drop_last
    assert len(replica0) == len(replica1) == 20 and replica0.isdisjoint(replica1)


def test_resume_mid_epoch_continues_it(dataset):
    shards, _, expected = dataset
    kwargs = dict(batch_size=3, dp_rank=1, dp_world_size=2, num_workers=2, epochs=2, seed=7, shuffle_buffer=8)
    reference = [b["keys"] for b in build_loader(str(shards), **kwargs)]
    assert len(reference) == 16
    first = build_loader(str(shards), **kwargs)
    head = [b["keys"] for b in itertools.islice(first, 5)]  # stop after 5 batches of epoch 0
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    assert (state["epoch"], state["batch"]) == (0, 5)
    resumed = build_loader(str(shards), **kwargs)
    resumed.load_state_dict(state)
    tail = [b["keys"] for b in resumed]
    assert head + tail == reference
    epoch0 = [k for batch in head + tail[:3] for k in batch]
    assert len(epoch0) == len(set(epoch0)) == 24 and set(epoch0) <= set(expected)

    other = build_loader(str(shards), **{**kwargs, "num_workers": 1})
    with pytest.raises(ValueError, match="num_workers"):
        other.load_state_dict(state)


@pytest.mark.parametrize("workers, drop_last, stop", [(3, False, 4), (3, False, 9), (2, True, 1)])
def test_resume_any_worker_phase(dataset, workers, drop_last, stop):
    shards, _, _ = dataset
    kwargs = dict(batch_size=5, dp_rank=0, dp_world_size=2, num_workers=workers, epochs=1, drop_last=drop_last)
    reference = [b["keys"] for b in build_loader(str(shards), **kwargs)]
    assert len(reference) == (5 if drop_last is False else 4)
    first = build_loader(str(shards), **kwargs)
    head = [b["keys"] for b in itertools.islice(first, stop)]
    resumed = build_loader(str(shards), **kwargs)
    resumed.load_state_dict(first.state_dict())
    assert head + [b["keys"] for b in resumed] == reference


def test_workers_persist_across_epochs_and_passes(dataset, tmp_path, monkeypatch):
    """One set of worker processes serves every epoch and pass of a loader, and each epoch serves
    exactly what a DataLoader made for that epoch alone (the design before persistent workers) does."""
    shards, pal, _ = dataset
    started = tmp_path / "workers.txt"

    def record(worker_id=0):  # runs in each new worker process (fork: the patch is inherited)
        with open(started, "a") as f:
            f.write(f"{os.getpid()}\n")

    monkeypatch.setattr(signals, "worker_init", record)
    kwargs = dict(batch_size=3, dp_rank=1, dp_world_size=2, num_workers=2, seed=7, shuffle_buffer=8)
    per_epoch = []
    for epoch in range(3):
        alone = build_loader(str(shards), epochs=epoch + 1, **kwargs)
        alone.set_epoch(epoch)
        per_epoch.append([b["keys"] for b in alone])
        del alone
    assert len(started.read_text().split()) == 6  # 2 workers per fresh loader
    assert per_epoch[0] != per_epoch[1] != per_epoch[2] and all(len(e) == 8 for e in per_epoch)
    started.unlink()

    loader = build_loader(str(shards), epochs=3, **kwargs)
    head = [b["keys"] for b in itertools.islice(loader, 5)]  # a pass stopped inside epoch 0
    rest = [b["keys"] for b in loader]  # a new pass over the same workers continues it
    assert head + rest == [k for epoch in per_epoch for k in epoch]
    pids = started.read_text().split()
    assert len(pids) == len(set(pids)) == 2, pids  # 3 epochs, 2 passes, the same 2 processes

    # Images quantized on the fly: batches do not depend on the worker count, so workers=0 is the reference.
    source = open_source(shards.parent / "d.npz")
    kw = dict(batch_size=5, dp_rank=0, dp_world_size=2, augment="cifar", seed=3, epochs=3)
    reference = [b["keys"] + b["tokens"].flatten().tolist() for b in ImageLoader(source, pal, RES, num_workers=0, **kw)]
    started.unlink()
    images = ImageLoader(source, pal, RES, num_workers=2, **kw)
    head = [b["keys"] + b["tokens"].flatten().tolist() for b in itertools.islice(images, 3)]
    got = head + [b["keys"] + b["tokens"].flatten().tolist() for b in images]
    assert got == reference and len(got) == 12 and reference[:4] != reference[4:8]
    pids = started.read_text().split()
    assert len(pids) == len(set(pids)) == 2, pids


def test_manifest_must_match_the_run(dataset):
    shards, pal, _ = dataset
    with pytest.raises(ShardError) as e:
        build_loader(str(shards), batch_size=4, dp_rank=0, dp_world_size=1, expected_palette_sha256="0" * 64)
    assert "dataset.json" in str(e.value) and "--palette" in str(e.value)
    with pytest.raises(ShardError, match="--resolution 32"):
        build_loader(str(shards), batch_size=4, dp_rank=0, dp_world_size=1, expected_resolution=32)


def fake_shard_set(root, samples, name="train-000000.tar", entry_name=None, count=None):
    """A one-shard set with the given (key, tokens) samples, bypassing the builder's checks."""
    root.mkdir()
    keys = [k for k, _ in samples]
    width = max(len(t) for _, t in samples)
    tokens = np.zeros((len(samples), width), np.int64)
    for i, (_, t) in enumerate(samples):
        tokens[i, :len(t)] = t
    path = str(root / name)
    _write_tar(path, keys, tokens, [0] * len(keys))
    if any(len(t) != width for _, t in samples):  # rewrite the short sample's member
        import io
        import tarfile  # noqa: E401
        with tarfile.open(path, "w") as tar:
            for k, t in samples:
                payload = np.asarray(t, "<u2").tobytes()
                info = tarfile.TarInfo(f"{k}.tokens")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    manifest = {"format": "igpt-ds-shards", "version": 1, "palette_sha256": "ab" * 32, "num_colors": 512,
                "resolution": 2, "num_samples": count or len(samples), "label_names": [],
                "shards": [{"name": entry_name or name, "samples": count or len(samples), "bytes": 0, "sha256": ""}]}
    (root / "dataset.json").write_text(json.dumps(manifest))
    return root


def read_all(root, **kw):
    return [b for b in build_loader(str(root), batch_size=1, dp_rank=0, dp_world_size=1, num_workers=0,
                                    epochs=1, shuffle=False, **kw)]


def test_bad_samples_name_shard_and_key(tmp_path):
    good = [0, 1, 2, 3]
    root = fake_shard_set(tmp_path / "wide", [("a_v0", good), ("b_v0", [0, 1, 2, 3, 4])])
    with pytest.raises(ShardError, match=r"train-000000.tar: sample 'b_v0' has 5 tokens, expected 4"):
        read_all(root)
    root = fake_shard_set(tmp_path / "big", [("a_v0", good), ("c_v0", [0, 512, 1, 1])])
    with pytest.raises(ShardError, match=r"sample 'c_v0' has token 512"):
        read_all(root)
    root = fake_shard_set(tmp_path / "ok", [("a_v0", good), ("d_v0", good), ("e_v0", good)])
    assert len(read_all(root)) == 3
    path = root / "train-000000.tar"
    data = path.read_bytes()
    path.write_bytes(data[:2048 + 700])  # a sample is 4 blocks of 512: cut inside the second
    with pytest.raises(ShardError, match=r"train-000000.tar: corrupt or truncated tar after sample 'a_v0'"):
        read_all(root)
    path.write_bytes(b"\x13" * 4096)
    with pytest.raises(ShardError, match=r"train-000000.tar: corrupt or truncated tar"):
        read_all(root)
    root = fake_shard_set(tmp_path / "short", [("a_v0", good)], count=3)
    with pytest.raises(ShardError, match=r"ends after 1 samples, its manifest lists 3"):
        read_all(root)


@pytest.mark.parametrize("name", ["../train-000000.tar", "/etc/passwd", "pipe:cat x.tar", "sub/x.tar",
                                  "http://example.com/x.tar", "..", "x\\..\\y.tar"])
def test_manifest_cannot_point_outside_its_directory(tmp_path, name):
    root = fake_shard_set(tmp_path / "m", [("a_v0", [0, 1, 2, 3])], entry_name=name)
    with pytest.raises(ShardError, match="plain file name"):
        read_all(root)


# ---- K pre-quantized views per image: a fresh crop every epoch -------------------------------

@pytest.fixture(scope="module")
def four_views(tmp_path_factory):
    """12 images of 24x24, each stored as ONE sample of 4 random-resized 8x8 crops (shards of 5 images)."""
    root = tmp_path_factory.mktemp("views")
    imgs = np.random.default_rng(3).integers(0, 256, (12, 24, 24, 3), dtype=np.uint8)
    np.savez(root / "d.npz", images=imgs, labels=np.arange(12) % 3)
    pal = np.random.default_rng(1).uniform(-1, 1, (512, 3)).astype(np.float32)
    build_shards(open_source(root / "d.npz"), str(root / "shards"), pal,
                 BuildSettings(resolution=RES, shard_size=5, crop="random-resized", views=4), progress=False)
    return root / "shards"


def stored_views(shards):
    """key -> the set of its 4 stored views (as token tuples), read straight from the tars."""
    import tarfile

    out = {}
    for path in read_manifest(shards).shard_paths():
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".tokens"):
                    tokens = np.frombuffer(tar.extractfile(member).read(), dtype="<u2").reshape(4, RES * RES)
                    out[member.name[:-len(".tokens")]] = {tuple(v) for v in tokens.tolist()}
    return out


def test_k_views_give_k_epochs_of_distinct_crops_one_image_once_per_epoch(four_views):
    manifest = read_manifest(four_views)
    assert manifest.views == 4 and manifest.num_samples == manifest.data["num_images"] == 12
    assert manifest.data["crop"]["mode"] == "random-resized" and manifest.data["crop"]["shorter_side"] == [256, 384]
    views = stored_views(four_views)
    assert all(len(v) == 4 for v in views.values())  # 4 different crops stored per image
    loader = build_loader(four_views, batch_size=3, dp_rank=0, dp_world_size=1, num_workers=2, seed=5,
                          shuffle_buffer=4, epochs=8)
    # an epoch is one pass over the IMAGES: the warm-up's "one epoch" and --train-epochs count images
    assert loader.num_samples == 12 and loader.batches_per_epoch == 4
    served = collections.defaultdict(list)  # key -> its tokens, epoch by epoch
    for b, batch in enumerate(loader):
        epoch = b // loader.batches_per_epoch
        assert len(set(batch["keys"])) == len(batch["keys"])  # never two views of one image in a batch
        for key, tokens in zip(batch["keys"], batch["tokens"].numpy()):
            served[key].append((epoch, tuple(tokens.tolist())))
    assert set(served) == set(views)
    for key, seen in served.items():
        assert [e for e, _ in seen] == list(range(8))  # once per epoch
        first, second = [t for _, t in seen[:4]], [t for _, t in seen[4:]]
        assert set(first) == views[key] and set(second) == views[key]  # each cycle of 4 epochs: all 4 views
    # the order of views is seeded: another seed serves other views at epoch 0 (for most images)
    other = build_loader(four_views, batch_size=3, dp_rank=0, dp_world_size=1, num_workers=0, seed=6, epochs=1)
    epoch0 = {k: t for batch in other for k, t in zip(batch["keys"], batch["tokens"].numpy().tolist())}
    assert sum(tuple(epoch0[k]) != served[k][0][1] for k in views) >= 6


def test_a_view_count_that_does_not_match_the_manifest_is_refused(four_views, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(four_views, copy)
    data = json.loads((copy / "dataset.json").read_text())
    data["views"] = 2
    (copy / "dataset.json").write_text(json.dumps(data))
    loader = build_loader(copy, batch_size=3, dp_rank=0, dp_world_size=1, num_workers=0, epochs=1)
    with pytest.raises(ShardError, match=r"has 256 tokens, expected 2 views x 64 .*holds 4 views: the manifest "
                                         r"does not describe this shard"):
        next(iter(loader))
    data["views"] = 0
    (copy / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(ShardError, match=r"dataset.json: field 'views' is 0"):
        read_manifest(copy)
