"""load_pretrained and tools/convert_checkpoint.py: formats, round trips, bad input, no partial output."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import igpt_ds
from igpt_ds.checkpoint import consolidated as checkpoint
from igpt_ds.checkpoint.formats import expected_shapes, read_checkpoint
from igpt_ds.config import get_preset
from igpt_ds.model.transformer import IGPTModel
from igpt_ds.parallel.weights import full_state_dict

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def random_model(seed=0, **overrides):
    cfg = get_preset("igpt-tiny", resolution=8, n_layer=2, **overrides)
    torch.manual_seed(seed)
    model = IGPTModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2)
    return model


def tokens_for(cfg, batch=2):
    return torch.randint(0, 512, (batch, cfg.seq_len), generator=torch.Generator().manual_seed(1))


def convert_main():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", ROOT / "tools" / "convert_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("variant", [{}, {"norm": "rmsnorm", "activation": "quick_gelu", "bias": False},
                                     {"objective": "bert"}])
def test_expected_shapes_match_the_model(variant):
    model = random_model(**variant)
    assert expected_shapes(model.cfg) == {n: tuple(p.shape) for n, p in model.named_parameters()}


def test_load_pretrained_consolidated(tmp_path):
    model = random_model()
    checkpoint.save_consolidated(tmp_path / "export", model.cfg, model.state_dict())
    loaded, cfg, palette = igpt_ds.load_pretrained(tmp_path / "export", device="cpu")
    assert cfg == model.cfg and palette is None and not loaded.training
    tokens = tokens_for(cfg)
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
        assert len(loaded.hidden_states(tokens)) == cfg.n_layer + 1


def test_load_pretrained_consolidated_with_palette(tmp_path):
    palette_mod = pytest.importorskip("igpt_ds.palette")
    import numpy as np

    model = random_model()
    palette = np.random.default_rng(0).uniform(-1, 1, (512, 3)).astype(np.float32)
    checkpoint.save_consolidated(tmp_path / "export", model.cfg, model.state_dict(), palette=palette)
    _, _, loaded = igpt_ds.load_pretrained(tmp_path / "export")
    assert palette_mod.palette_sha256(loaded) == palette_mod.palette_sha256(palette)


def test_convert_consolidated_hf_round_trip(tmp_path):
    main = convert_main()
    model = random_model(norm="rmsnorm", activation="quick_gelu", bias=False)
    checkpoint.save_consolidated(tmp_path / "a", model.cfg, model.state_dict())
    assert main([str(tmp_path / "a"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert main([str(tmp_path / "hf"), str(tmp_path / "b"), "--to", "consolidated"]) == 0
    assert checkpoint.is_consolidated(tmp_path / "b")
    loaded, cfg, _ = igpt_ds.load_pretrained(tmp_path / "hf")  # the HF directory loads directly too
    tokens = tokens_for(model.cfg)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=1e-5)
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # bf16 output: weights stored as bf16, and the loaded model is close to the fp32 one.
    assert main([str(tmp_path / "b"), str(tmp_path / "c"), "--to", "consolidated", "--dtype", "bf16"]) == 0
    assert all(t.dtype == torch.bfloat16 for t in load_file(str(tmp_path / "c" / "model.safetensors")).values())
    assert read_checkpoint(tmp_path / "c")[0] == model.cfg


def test_unknown_directory_lists_what_was_looked_for(tmp_path, capsys):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError) as e:
        igpt_ds.load_pretrained(tmp_path / "bad")
    msg = str(e.value)
    assert "Looked for" in msg and "igpt-ds-consolidated" in msg and '"model_type": "imagegpt"' in msg
    assert "config.json" in msg  # what was found
    with pytest.raises(FileNotFoundError):
        igpt_ds.load_pretrained(tmp_path / "missing")
    assert convert_main()([str(tmp_path / "bad"), str(tmp_path / "out"), "--to", "hf"]) == 2
    assert "Looked for" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_config_and_weights_that_disagree(tmp_path, capsys):
    model = random_model()
    checkpoint.save_consolidated(tmp_path / "export", model.cfg, model.state_dict())
    meta = json.loads((tmp_path / "export" / "config.json").read_text())
    meta["model"]["d_model"] = 64  # the weights are 128 wide
    (tmp_path / "export" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"embed\.wte\.weight has shape \(512, 128\).*needs \(512, 64\)"):
        igpt_ds.load_pretrained(tmp_path / "export")
    # The same through the converter: a clear error and no output directory, not even a temporary one.
    assert convert_main()([str(tmp_path / "export"), str(tmp_path / "out"), "--to", "hf"]) == 2
    assert "needs (512, 64)" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["export"]

    # HF: a tensor whose shape disagrees with config.json is named with both shapes.
    from igpt_ds.checkpoint import hf as hf

    cfg = model.cfg.replace(norm="rmsnorm", bias=False)
    hf.save_hf(tmp_path / "hf", cfg, full_state_dict(IGPTModel(cfg)))
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    tensors["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(128, 256)
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(ValueError,
                       match=r"transformer\.h\.1\.mlp\.c_fc\.weight has shape \(128, 256\).*needs \(128, 512\)"):
        igpt_ds.load_pretrained(tmp_path / "hf")


def test_convert_refuses_existing_output_and_unrepresentable_models(tmp_path, capsys):
    main = convert_main()
    model = random_model()  # layernorm: HF ImageGPT cannot represent it
    checkpoint.save_consolidated(tmp_path / "export", model.cfg, model.state_dict())
    assert main([str(tmp_path / "export"), str(tmp_path / "hf"), "--to", "hf"]) == 2
    assert "layernorm" in capsys.readouterr().err and not (tmp_path / "hf").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    assert main([str(tmp_path / "export"), str(tmp_path / "busy"), "--to", "consolidated"]) == 2
    assert "not empty" in capsys.readouterr().err and os.listdir(tmp_path / "busy") == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["busy", "export"]


def test_convert_help_runs_as_a_script():
    out = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--to {consolidated,hf,deepspeed}" in out.stdout and "Examples" in out.stdout
