"""KV-cached decoding and sampling: cached == uncached, completions keep their prompt, the PNG grid."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from igpt_ds.config import get_preset
from igpt_ds.evaluate.sampling import complete, filter_logits, generate, image_grid, sample
from igpt_ds.model.transformer import IGPTModel
from igpt_ds.parallel import layout as parallel
from igpt_ds.parallel.weights import full_state_dict, load_full_state_dict
from igpt_ds.testing import run_ranks

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def random_model(seed=0, **overrides):
    """igpt-tiny at 8x8 with every weight random, so the logits are far from uniform."""
    cfg = get_preset("igpt-tiny", resolution=8, n_layer=2, **overrides)
    torch.manual_seed(seed)
    model = IGPTModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3)
    return model


def test_cached_forward_in_chunks_equals_full_forward():
    model = random_model(norm="rmsnorm", activation="quick_gelu", bias=False)
    x = torch.randint(0, 512, (3, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache()
        # first call: SOS + 10 pixels -> logits of positions 0..10; then chunks and single steps
        parts = [model(x[:, :10], cache=cache), model(x[:, 10:30], cache=cache)]
        parts += [model(x[:, t:t + 1], cache=cache) for t in range(30, 63)]
    assert [p.shape[1] for p in parts[:2]] == [11, 20] and cache.length == 64
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="past the model's 64"):
        model(x[:, :1], cache=cache)


@pytest.mark.parametrize("kwargs", [{}, {"top_k": 8}, {"top_p": 0.8, "temperature": 0.7}])
def test_cached_sampling_gives_the_same_tokens_as_uncached(kwargs):
    model = random_model()
    cached = sample(model, 3, seed=7, **kwargs)
    assert cached.shape == (3, 64) and cached.min() >= 0 and cached.max() < 512
    assert torch.equal(cached, sample(model, 3, seed=7, use_cache=False, **kwargs))
    assert torch.equal(cached, sample(model, 3, seed=7, **kwargs))  # seeded
    assert not torch.equal(cached, sample(model, 3, seed=8, **kwargs))
    assert len({tuple(r) for r in cached.tolist()}) == 3  # each row its own draws


def test_completions_keep_the_prompt_and_match_uncached():
    model = random_model()
    prompts = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(2))
    out = complete(model, prompts, completions=3, seed=1, batch_size=4)
    assert out.shape == (2, 3, 64)
    assert torch.equal(out[:, :, :32], prompts[:, None].expand(2, 3, 32))
    assert len({tuple(r) for r in out[:, :, 32:].reshape(6, 32).tolist()}) == 6
    assert torch.equal(out, complete(model, prompts, completions=3, seed=1, batch_size=4, use_cache=False))


def test_filtering():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.equal(filter_logits(logits, temperature=0), torch.tensor([[1.0, 0, 0, 0]]))
    assert (filter_logits(logits, top_k=2)[0, 2:] == 0).all()
    p = torch.softmax(logits, -1)[0]  # 0.64, 0.24, 0.09, 0.03
    kept = filter_logits(logits, top_p=0.85)[0]
    assert (kept[:2] > 0).all() and (kept[2:] == 0).all()
    torch.testing.assert_close(kept[:2], p[:2] / p[:2].sum())
    assert (filter_logits(logits, top_p=0.5)[0, 1:] == 0).all()  # the top token alone has the mass
    torch.testing.assert_close(filter_logits(logits, temperature=2.0)[0], torch.softmax(logits / 2, -1)[0])
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(logits, top_p=0.0)


def test_bert_models_cannot_sample():
    model = random_model(objective="bert")
    with pytest.raises(ValueError, match="autoregressive"):
        sample(model, 1)
    with pytest.raises(ValueError, match="autoregressive"):
        model.new_cache()


def tp_sampling_body(rank, world, cfg, weights, prompt):
    state = parallel.initialize(tensor_parallel=world, model=cfg)
    torch.set_num_threads(1)
    model = IGPTModel(cfg, state.tp_group).eval()
    load_full_state_dict(model, weights)
    cache = model.new_cache()
    with torch.no_grad():
        model(prompt, cache=cache)
        local_k = tuple(cache.layers[0].k.shape)
    return generate(model, prompt, generator=torch.Generator().manual_seed(3)), local_k


def test_tp2_cached_sampling_matches_tp1():
    model = random_model()
    prompt = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(4))
    ref = generate(model, prompt, generator=torch.Generator().manual_seed(3))
    for tokens, k_shape in run_ranks(tp_sampling_body, 2, model.cfg, full_state_dict(model), prompt):
        assert torch.equal(tokens, ref)
        assert k_shape == (2, model.cfg.n_head // 2, 64, model.cfg.head_dim)  # each rank caches its own heads


def test_image_grid_geometry():
    images = np.arange(2 * 3 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 4, 3)
    grid = image_grid(images, pad=2, scale=3)
    assert grid.shape == (2 * 12 + 3 * 2, 3 * 12 + 4 * 2, 3)
    cell = grid[2 + 14:2 + 14 + 12, 2 + 2 * 14:2 + 2 * 14 + 12]  # row 1, column 2
    assert np.array_equal(cell[::3, ::3], images[1, 2])


def sample_main():
    spec = importlib.util.spec_from_file_location("sample_tool", ROOT / "tools" / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_sample_cli_grid(tmp_path, capsys):
    palette_mod = pytest.importorskip("igpt_ds.palette")
    pytest.importorskip("igpt_ds.data.sources")
    from PIL import Image

    from igpt_ds.checkpoint import consolidated as checkpoint

    rng = np.random.default_rng(0)
    palette = rng.uniform(-1, 1, (512, 3)).astype(np.float32)
    model = random_model(norm="rmsnorm", activation="quick_gelu", bias=False)
    checkpoint.save_consolidated(tmp_path / "model", model.cfg, model.state_dict(), palette=palette)
    images = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "images.npz", images=images)

    main = sample_main()
    n, k, scale, pad = 2, 3, 2, 2
    assert main(["--checkpoint", str(tmp_path / "model"), "--data", str(tmp_path / "images.npz"), "--split", "train",
                 "--num-images", str(n), "--completions", str(k), "--scale", str(scale), "--seed", "1",
                 "--out", str(tmp_path / "grid.png")]) == 0
    assert "samples/s" in capsys.readouterr().out
    grid = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB"))
    cell = 8 * scale
    assert grid.shape == ((k + 1) * cell + (k + 2) * pad, n * cell + (n + 1) * pad, 3)
    seen = palette_mod.dequantize(palette_mod.quantize(images[:n], palette), palette)  # palette round trip
    for col in range(n):
        left = pad + col * (cell + pad)
        for row in range(k + 1):
            top = pad + row * (cell + pad)
            img = grid[top:top + cell:scale, left:left + cell:scale]
            assert np.array_equal(img[:4], seen[col, :4]), (row, col)  # the conditioning top half
            if row == 0:
                assert np.array_equal(img, seen[col])

    assert main(["--checkpoint", str(tmp_path / "model"), "--unconditional", "3", "--scale", "1",
                 "--out", str(tmp_path / "uncond.png"), "--no-cache"]) == 0
    assert np.asarray(Image.open(tmp_path / "uncond.png")).shape == (8 + 2 * pad, 3 * 8 + 4 * pad, 3)
