"""Hugging Face ImageGPT <-> iGPT-DS: logits compared with transformers' own ImageGPTForCausalImageModeling."""
import json
import os

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling  # noqa: E402

import igpt_ds  # noqa: E402
from igpt_ds.checkpoint import hf as hf  # noqa: E402
from igpt_ds.config import SOS_TOKEN, get_preset  # noqa: E402
from igpt_ds.model.transformer import IGPTModel  # noqa: E402
from igpt_ds.parallel.weights import full_state_dict  # noqa: E402

TOL = 1e-4  # the bound (fp32); observed differences are ~1e-6


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def hf_model(seed=0, zero_biases=False, **overrides):
    """A random small HF ImageGPT (every weight random, SOS row included), no dropout."""
    kw = dict(vocab_size=513, n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
              attn_pdrop=0.0)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = ImageGPTForCausalImageModeling(ImageGPTConfig(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(std=0.3)
            if zero_biases and name.endswith("bias"):
                p.zero_()
    return model


def hf_logits(model, tokens):
    """HF's next-pixel logits for our pixel tokens: input [SOS, p_0, ..., p_{T-2}], position t predicts p_t."""
    sos = torch.full((tokens.shape[0], 1), SOS_TOKEN, dtype=torch.long)
    with torch.no_grad():
        return model(torch.cat([sos, tokens[:, :-1]], dim=1)).logits


def pixel_tokens(batch, length, seed=1):
    return torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("activation,zero_biases", [("quick_gelu", False), ("quick_gelu", True),
                                                    ("gelu_pytorch_tanh", False)])
def test_hf_import_matches_hf_logits(tmp_path, activation, zero_biases):
    ref = hf_model(activation_function=activation, zero_biases=zero_biases)
    ref.save_pretrained(tmp_path / "hf")
    model, cfg, palette = igpt_ds.load_pretrained(tmp_path / "hf")
    assert palette is None and not model.training
    assert (cfg.norm, cfg.vocab_size, cfg.resolution, cfg.objective) == ("rmsnorm", 512, 8, "ar")
    assert cfg.activation == {"quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu"}[activation]
    assert cfg.bias is (not zero_biases)  # all-zero Conv1D biases (OpenAI's weights) give bias=False
    # SOS is row 512 of HF's 513-row embedding.
    wte = ref.transformer.wte.weight
    assert torch.equal(model.embed.sos, wte[SOS_TOKEN]) and torch.equal(model.embed.wte.weight, wte[:512])
    tokens = pixel_tokens(3, cfg.seq_len)
    theirs = hf_logits(ref, tokens)
    with torch.no_grad():
        ours = model(tokens)
    assert theirs.shape == ours.shape == (3, 64, 512)  # HF's head has vocab_size - 1 = 512 outputs too
    torch.testing.assert_close(ours, theirs, rtol=0, atol=TOL)
    # A prefix: HF sees [SOS, p_0..p_8] and predicts p_0..p_9, as model(p_0..p_9) does.
    torch.testing.assert_close(model(tokens[:, :10]).detach(), hf_logits(ref, tokens[:, :10]), rtol=0, atol=TOL)


@pytest.mark.parametrize("variant", [dict(bias=False, activation="quick_gelu"), dict(bias=True, activation="gelu")])
def test_export_loads_in_hf_and_matches(tmp_path, variant):
    cfg = get_preset("igpt-tiny", resolution=8, n_layer=2, norm="rmsnorm", **variant)
    torch.manual_seed(0)
    model = IGPTModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3)
    sd = full_state_dict(model)
    hf.save_hf(tmp_path / "out", cfg, sd)
    ref, info = ImageGPTForCausalImageModeling.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    tokens = pixel_tokens(2, cfg.seq_len)
    with torch.no_grad():
        ours = model(tokens)
    torch.testing.assert_close(hf_logits(ref.eval(), tokens), ours, rtol=0, atol=TOL)
    # ... and back: the same config and bit-identical weights.
    back_cfg, back_sd, _, _ = hf.load_hf(tmp_path / "out")
    assert back_cfg.replace(name=cfg.name) == cfg
    assert set(back_sd) == set(sd) and all(torch.equal(back_sd[k], sd[k]) for k in sd)


def test_palette_travels_as_preprocessor_clusters(tmp_path):
    cfg = get_preset("igpt-tiny", resolution=8, n_layer=1, norm="rmsnorm", bias=False)
    palette = np.random.default_rng(0).uniform(-1, 1, (512, 3)).astype(np.float32)
    hf.save_hf(tmp_path / "out", cfg, full_state_dict(IGPTModel(cfg)), palette=palette)
    pre = json.loads((tmp_path / "out" / hf.PREPROCESSOR_FILE).read_text())
    assert pre["image_processor_type"] == "ImageGPTImageProcessor" and pre["size"] == {"height": 8, "width": 8}
    np.testing.assert_array_equal(hf.read_hf_palette(tmp_path / "out"), palette)


def test_export_refuses_what_hf_cannot_represent(tmp_path):
    for cfg, words in [(get_preset("igpt-tiny", resolution=8, n_layer=1), "norm='layernorm'"),
                       (get_preset("igpt-tiny", resolution=8, n_layer=1, norm="rmsnorm", objective="bert"), "bert")]:
        with pytest.raises(ValueError, match=words):
            hf.save_hf(tmp_path / "out", cfg, full_state_dict(IGPTModel(cfg)))
        assert not (tmp_path / "out").exists() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("change,words", [(dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse"),
                                          (dict(activation_function="gelu"), "activation_function='gelu'"),
                                          (dict(n_positions=60), "not a square")])
def test_hf_config_we_cannot_compute_is_refused(change, words):
    hf_cfg = {"model_type": "imagegpt", "n_positions": 64, "n_embd": 32, "n_layer": 1, "n_head": 4, **change}
    with pytest.raises(ValueError, match=words):
        hf.config_from_hf(hf_cfg)


def test_pytorch_model_bin_loads_with_weights_only(tmp_path):
    ref = hf_model()
    ref.save_pretrained(tmp_path / "hf")
    os.remove(tmp_path / "hf" / "model.safetensors")
    torch.save(ref.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    model, cfg, _ = igpt_ds.load_pretrained(tmp_path / "hf")
    tokens = pixel_tokens(2, cfg.seq_len)
    torch.testing.assert_close(model(tokens).detach(), hf_logits(ref, tokens), rtol=0, atol=TOL)


class Payload:
    """Unpickling this runs code: it creates the file named by ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_payload_is_refused_and_does_not_run(tmp_path):
    d = tmp_path / "hf"
    hf_model().save_pretrained(d)
    os.remove(d / "model.safetensors")
    marker = tmp_path / "payload-ran"
    torch.save({"transformer.wte.weight": torch.zeros(513, 32), "evil": Payload(marker)}, d / "pytorch_model.bin")
    with pytest.raises(ValueError, match="weights_only=True"):
        igpt_ds.load_pretrained(d)
    assert not marker.exists()
