"""Fine-tuning data: augmentation at pixel level, on-the-fly quantization vs shards, the DP split."""
import collections

import numpy as np
import pytest
import torch

from igpt_ds.data.images import ImageLoader, augment_view, cifar_augment, source_labels
from igpt_ds.data.shards import BuildSettings, build_shards, resize_view
from igpt_ds.data.sources import open_source
from igpt_ds.evaluate.classifier import confusion_matrix, modal_prediction
from igpt_ds.train.classify_task import check_labels

PAL = np.random.default_rng(1).uniform(-1, 1, (512, 3)).astype(np.float32)


def coded_image(h=32, w=32):
    """Each pixel's (R, G) is its (row, column): where a pixel came from is readable."""
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0], img[..., 1] = np.arange(h)[:, None], np.arange(w)[None, :]
    img[..., 2] = 7
    return img


def reflect(i, n):
    """numpy 'reflect' padding index: -1 -> 1, n -> n - 2."""
    return -i if i < 0 else 2 * (n - 1) - i if i >= n else i


def test_cifar_augment_is_reflect_pad_crop_and_flip():
    img = coded_image()
    offsets, flips = set(), collections.Counter()
    for seed in range(300):
        out = cifar_augment(img, np.random.default_rng(seed))
        assert out.shape == img.shape and out.dtype == np.uint8
        flipped = out[0, 0, 1] > out[0, -1, 1]  # columns run 0..4 -> 27..31 unless flipped
        view = out[:, ::-1] if flipped else out
        # The unflipped view is padded[top:top + 32, left:left + 32] of the 4-pixel reflection pad.
        top, left = None, None
        for t in range(9):
            for l in range(9):
                rows = [reflect(r + t - 4, 32) for r in range(32)]
                cols = [reflect(c + l - 4, 32) for c in range(32)]
                if (np.array_equal(view[..., 0], np.repeat(np.array(rows)[:, None], 32, 1))
                        and np.array_equal(view[..., 1], np.repeat(np.array(cols)[None, :], 32, 0))):
                    top, left = t, l
        assert top is not None, f"seed {seed}: output is not a crop of the reflection-padded image"
        assert (view[..., 2] == 7).all()
        offsets.add((top, left))
        flips[bool(flipped)] += 1
    tops, lefts = {t for t, _ in offsets}, {l for _, l in offsets}
    assert tops == set(range(9)) and lefts == set(range(9))  # every offset 0..8, none beyond
    assert 100 < flips[True] < 200  # about half flipped


def test_cifar_augment_pixels_by_hand():
    img = coded_image(6, 6)
    out = cifar_augment(img, np.random.default_rng(0), pad=2, flip=True)
    padded = np.pad(img, ((2, 2), (2, 2), (0, 0)), mode="reflect")
    np.testing.assert_array_equal(padded[0, :, 0], [2] * 10)  # the top pad row is image row 2
    np.testing.assert_array_equal(padded[:, 0, 0], [2, 1, 0, 1, 2, 3, 4, 5, 4, 3])  # reflection without edge repeat
    matches = [(t, l) for t in range(5) for l in range(5)
               if np.array_equal(out, padded[t:t + 6, l:l + 6][:, ::-1])]
    assert matches


def test_augment_views_have_the_model_resolution():
    img = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    rng = np.random.default_rng(0)
    for mode in ("cifar", "random-resized-crop", "none"):
        assert augment_view(img, 16, mode, rng).shape == (16, 16, 3)
    np.testing.assert_array_equal(augment_view(img, 16, "none"), resize_view(img, 16, "center"))
    with pytest.raises(ValueError, match="choose one of"):
        augment_view(img, 16, "mixup", rng)


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    root = tmp_path_factory.mktemp("aug")
    imgs = np.random.default_rng(0).integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)
    np.savez(root / "d.npz", images=imgs, labels=np.arange(50) % 5)
    return root, imgs


def test_on_the_fly_quantization_equals_the_shard_pipeline(npz):
    root, imgs = npz
    source = open_source(root / "d.npz")
    build_shards(source, str(root / "shards"), PAL, BuildSettings(resolution=8, shard_size=20), progress=False)
    from igpt_ds.data.tokens import build_loader

    from_shards = {}
    for batch in build_loader(str(root / "shards"), batch_size=10, dp_rank=0, dp_world_size=1, num_workers=0,
                              shuffle=False, epochs=1):
        for key, tokens in zip(batch["keys"], batch["tokens"]):
            from_shards[key.removesuffix("_v0")] = tokens.numpy()
    loader = ImageLoader(source, PAL, 8, batch_size=10, dp_rank=0, dp_world_size=1, augment="none",
                         shuffle=False, drop_last=False, num_workers=0, epochs=1)
    seen = 0
    for batch in loader:
        for key, tokens, _label in zip(batch["keys"], batch["tokens"], batch["labels"]):
            np.testing.assert_array_equal(tokens.numpy(), from_shards[key])
            seen += 1
    assert seen == len(from_shards) == 50


def test_dp_split_train_and_eval(npz):
    root, _ = npz
    source = open_source(root / "d.npz")

    def keys(dp, **kw):
        ld = ImageLoader(source, PAL, 8, batch_size=4, dp_rank=dp, dp_world_size=2, num_workers=0, epochs=1, **kw)
        return [(k, bool(v)) for b in ld for k, v in zip(b["keys"], b["valid"])], ld.batches_per_epoch

    # Training: whole rounds of 2 x 4, disjoint ranks, the same batch count on both.
    (a, na), (b, nb) = keys(0, augment="cifar", seed=3), keys(1, augment="cifar", seed=3)
    assert na == nb == 6 and len(a) == len(b) == 24 and not {k for k, _ in a} & {k for k, _ in b}
    # Evaluation: every image exactly once among the valid samples, padding marked invalid.
    (a, na), (b, nb) = keys(0, shuffle=False, drop_last=False), keys(1, shuffle=False, drop_last=False)
    assert na == nb == 7
    valid = collections.Counter(k for k, v in a + b if v)
    assert len(valid) == 50 and set(valid.values()) == {1}


def test_loader_is_deterministic_and_independent_of_workers(npz):
    root, _ = npz
    source = open_source(root / "d.npz")

    def run(workers, seed=0):
        ld = ImageLoader(source, PAL, 8, batch_size=5, dp_rank=0, dp_world_size=1, augment="cifar", seed=seed,
                         num_workers=workers, epochs=2)
        return torch.cat([b["tokens"] for b in ld])

    ref = run(0)
    assert torch.equal(ref, run(2)) and not torch.equal(ref, run(0, seed=1))
    assert not torch.equal(ref[:50], ref[50:])  # a new permutation and new augmentations each epoch


def test_resume_mid_epoch(npz):
    root, _ = npz
    source = open_source(root / "d.npz")
    make = lambda: ImageLoader(source, PAL, 8, batch_size=5, dp_rank=0, dp_world_size=1, augment="cifar",  # noqa
                               num_workers=0)
    straight = [b["tokens"] for _, b in zip(range(14), make())]
    first = make()
    it = iter(first)
    for _ in range(7):
        next(it)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    rest = [b["tokens"] for _, b in zip(range(7), resumed)]
    assert all(torch.equal(x, y) for x, y in zip(rest, straight[7:]))


def test_labels_and_class_counts(npz):
    root, _ = npz
    labels = source_labels(open_source(root / "d.npz"))
    assert check_labels(labels, [], None, "d") == 5
    with pytest.raises(ValueError, match="label 4 is out of range for 3 classes"):
        check_labels(labels, [], 3, "d")
    with pytest.raises(ValueError, match="names 5 classes but --num-classes is 6"):
        check_labels(labels, list("abcde"), 6, "d")
    with pytest.raises(ValueError, match="have no label"):
        check_labels(np.array([0, -1, 1]), [], None, "d")


def test_modal_prediction_and_confusion():
    one = lambda c, p=0.9: torch.log(torch.tensor([[p if i == c else (1 - p) / 2 for i in range(3)]]))  # noqa
    assert modal_prediction([one(0), one(2), one(2)], seed=0).item() == 2  # ties: tests/test_finetune.py
    cm = confusion_matrix(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2]), 3)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 1, 0], [0, 0, 1]])
