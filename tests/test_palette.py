"""Palette files, the HF-exact quantizer, dequantize and k-means."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from igpt_ds.palette import dequantize, fit_palette, load_palette, palette_sha256, pixel_levels, quantize, save_palette

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_palette(seed=0, k=512):
    return np.random.default_rng(seed).uniform(-1, 1, (k, 3)).astype(np.float32)


def test_loads_openai_format_file(tmp_path):
    # OpenAI's kmeans_centers.npy: a plain np.save of (512, 3) centres in [-1, 1].
    centres = random_palette(1)
    np.save(tmp_path / "kmeans_centers.npy", centres)
    loaded = load_palette(tmp_path / "kmeans_centers.npy")
    assert loaded.dtype == np.float32 and loaded.shape == (512, 3)
    np.testing.assert_array_equal(loaded, centres)
    # Same values stored as float64: same palette, same hash (the hash is of float32 LE bytes).
    np.save(tmp_path / "f64.npy", centres.astype(np.float64))
    assert palette_sha256(load_palette(tmp_path / "f64.npy")) == palette_sha256(centres)
    assert palette_sha256(centres) != palette_sha256(random_palette(2))


@pytest.mark.parametrize("array, words", [
    (np.zeros((256, 3), np.float32), "shape"),
    (np.zeros((512, 4), np.float32), "shape"),
    (np.zeros((512, 3), np.int64), "dtype"),
    (np.full((512, 3), 200.0, np.float32), "[-1, 1]"),
])
def test_bad_palette_names_file_and_fix(tmp_path, array, words):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(ValueError) as e:
        load_palette(path)
    assert str(path) in str(e.value) and words in str(e.value) and "make_palette" in str(e.value)


def test_save_is_atomic_and_round_trips(tmp_path):
    palette = random_palette(3)
    save_palette(tmp_path / "p.npy", palette)
    assert os.listdir(tmp_path) == ["p.npy"]
    np.testing.assert_array_equal(load_palette(tmp_path / "p.npy"), palette)
    with pytest.raises(ValueError):
        save_palette(tmp_path / "q.npy", palette * 3)
    assert os.listdir(tmp_path) == ["p.npy"]


def hf_tokens(images, palette):
    from transformers.models.imagegpt.image_processing_pil_imagegpt import ImageGPTImageProcessorPil

    processor = ImageGPTImageProcessorPil(clusters=palette, do_resize=False)
    return np.stack(processor(list(images), return_tensors=None)["input_ids"])


def test_quantize_equals_hf_token_for_token():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    palette = random_palette(4)
    # Exact ties: duplicated rows (first index must win) and rows equal to pixel levels.
    palette[100] = palette[7]
    palette[300:310] = pixel_levels()[rng.integers(0, 256, (10, 3))]
    images[0, 0, :10] = ((palette[300:310] + 1) * 127.5).round().astype(np.uint8)
    ours = quantize(images, palette)
    assert ours.dtype == np.int64 and ours.shape == (12, 256)
    np.testing.assert_array_equal(ours, hf_tokens(images, palette))
    assert not np.any(ours == 100)  # the duplicate of row 7 never wins a tie


def test_quantize_torch_input_and_chunking():
    images = np.random.default_rng(1).integers(0, 256, (3, 10, 7, 3), dtype=np.uint8)
    palette = random_palette(5)
    expected = quantize(images, palette)
    tokens = quantize(torch.from_numpy(images), palette, chunk_pixels=13)
    assert isinstance(tokens, torch.Tensor) and tokens.dtype == torch.int64
    np.testing.assert_array_equal(tokens.numpy(), expected)
    # Raster order: token (i, r * W + c) is pixel (r, c).
    single = quantize(images[:1, 4:5, 3:4], palette)
    assert single[0, 0] == expected[0, 4 * 7 + 3]
    with pytest.raises(ValueError, match="uint8"):
        quantize(images.astype(np.float32), palette)


def test_dequantize_inverts_quantize_on_palette_colours():
    palette = random_palette(6)
    tokens = np.random.default_rng(2).integers(0, 512, (2, 36))
    images = dequantize(tokens, palette)
    assert images.shape == (2, 6, 6, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(dequantize(tokens.reshape(2, 6, 6), palette), images)
    # Re-quantizing the colours gives tokens whose colours are the same pixels.
    np.testing.assert_array_equal(dequantize(quantize(images, palette), palette), images)
    with pytest.raises(ValueError, match="0..511"):
        dequantize(np.full((1, 4), 512), palette)


def planted_pixels(seed=0, per_colour=400):
    rng = np.random.default_rng(seed)
    planted = np.array([[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255],
                        [128, 128, 0], [0, 128, 128], [200, 100, 50]], dtype=np.int64)
    noise = rng.integers(-3, 4, (len(planted), per_colour, 3))
    pixels = np.clip(planted[:, None, :] + noise, 0, 255).reshape(-1, 3).astype(np.uint8)
    return planted, pixels[rng.permutation(len(pixels))]


def test_kmeans_recovers_planted_colours_deterministically():
    planted, pixels = planted_pixels()
    centres = fit_palette(pixels, clusters=8, seed=0, iters=50)
    assert centres.shape == (8, 3) and centres.dtype == np.float32
    found = (centres.astype(np.float64) + 1) * 127.5
    distance = np.abs(found[:, None, :] - planted[None, :, :]).max(-1)  # (found, planted)
    assert distance.min(0).max() < 2.0, "every planted colour has a centre within 2 levels"
    assert sorted(distance.argmin(1).tolist()) == list(range(8)), "one centre per planted colour"
    np.testing.assert_array_equal(centres, fit_palette(pixels, clusters=8, seed=0, iters=50))


def test_make_palette_cli(tmp_path):
    _, pixels = planted_pixels(per_colour=256)
    np.savez(tmp_path / "images.npz", images=pixels.reshape(-1, 16, 16, 3))
    out = tmp_path / "palette.npy"
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "make_palette.py"),
                             "--data", str(tmp_path / "images.npz"), "--out", str(out), "--clusters", "8",
                             "--sample-pixels", "1024", "--heldout-pixels", "512", "--device", "cpu",
                             "--resolution", "16"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "held-out reconstruction: MSE" in result.stdout
    palette = load_palette(out, clusters=8)
    mse = float(result.stdout.split("MSE ")[1].split()[0])
    assert mse < 10.0  # noise of +-3 levels around planted colours
    assert palette_sha256(palette) in result.stdout


def make_palette_tool(*args):
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "make_palette.py"), "--clusters", "4",
                             "--sample-pixels", "2048", "--heldout-pixels", "256", "--device", "cpu",
                             *map(str, args)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_make_palette_fits_the_pixels_of_resized_images(tmp_path):
    from igpt_ds.data.shards import resize_view

    # 24x24 images: a pixel-fine red/blue checkerboard (the model, at 8x8, sees purple) or plain green.
    rng = np.random.default_rng(0)
    board = (np.indices((24, 24)).sum(0) % 2).astype(bool)
    images = np.where(board[None, :, :, None], [255, 0, 0], [0, 0, 255]).repeat(32, 0)
    images[16:] = [0, 255, 0]
    images = np.clip(images + rng.integers(-3, 4, images.shape), 0, 255).astype(np.uint8)
    np.savez(tmp_path / "fine.npz", images=images)
    np.savez(tmp_path / "small.npz", images=np.stack([resize_view(im, 8) for im in images]))

    out = make_palette_tool("--data", tmp_path / "fine.npz", "--resolution", 8, "--out", tmp_path / "r8.npy")
    assert "resized to 8x8" in out and "fitted at resolution 8" in out
    make_palette_tool("--data", tmp_path / "fine.npz", "--resolution", "native", "--out", tmp_path / "native.npy")
    make_palette_tool("--data", tmp_path / "small.npz", "--resolution", "native", "--out", tmp_path / "small.npy")
    resized, native = load_palette(tmp_path / "r8.npy", 4), load_palette(tmp_path / "native.npy", 4)

    def nearest(palette, rgb):  # distance in 0..255 levels from ``rgb`` to the palette's closest colour
        return np.abs((palette.astype(np.float64) + 1) * 127.5 - rgb).max(1).min()

    assert nearest(resized, [128, 0, 128]) < 10 and nearest(resized, [255, 0, 0]) > 60
    assert nearest(native, [255, 0, 0]) < 10 and nearest(native, [128, 0, 128]) > 60
    # The same palette as a fit on images resized beforehand, bit for bit.
    np.testing.assert_array_equal(resized, load_palette(tmp_path / "small.npy", 4))
