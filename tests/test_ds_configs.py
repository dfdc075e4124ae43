"""ds_configs/: each config says what it is. The ones that claim the paper's recipe follow it (no
gradient clipping; bf16 only with the deviation stated); the others state their clipping as a choice;
the trainer reads a config with or without clipping."""
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "ds_configs").glob("*.json"))
PRESETS = {"igpt-s.json", "igpt-m.json", "igpt-l.json", "igpt-xl.json"}
PAPER = "the paper's recipe"
BF16_DEVIATION = "bf16 instead of the paper's fp32: "
CLIP_CHOICE = "Clips gradients at 1.0, which the paper does not"


def load(path):
    return json.loads(path.read_text())


def claims_the_paper(path):
    return PAPER in load(path)["_comment"]


def test_every_preset_claims_the_paper():
    assert PRESETS <= {p.name for p in CONFIGS}
    assert all(claims_the_paper(ROOT / "ds_configs" / name) for name in PRESETS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_says_what_it_is(path):
    cfg = load(path)
    comment = cfg["_comment"]
    bf16 = cfg.get("bf16", {}).get("enabled", False)
    fp16 = cfg.get("fp16", {}).get("enabled", False)
    clip = cfg.get("gradient_clipping", 0.0)
    if claims_the_paper(path):
        assert not clip, f"{path.name} claims {PAPER} but clips gradients (the paper does not)"
        assert not fp16, f"{path.name} claims {PAPER} in fp16"
        if bf16:
            assert BF16_DEVIATION in comment, f"{path.name}: bf16 without '{BF16_DEVIATION}' in its _comment"
    else:
        assert path.name not in PRESETS
        if clip:
            assert clip == 1.0 and CLIP_CHOICE in comment, f"{path.name}: clipping not stated as a choice"


def test_the_trainer_reads_a_config_with_and_without_clipping(tmp_path):
    from igpt_ds.train.engine import load_ds_config

    for path in CONFIGS:
        cfg = load(path)
        if cfg.get("fp16", {}).get("enabled") and not torch.cuda.is_available():
            continue  # refused on CPU for its precision (fp16 needs CUDA), not for its clipping
        ds = load_ds_config(str(path), 1)
        assert ds.config.get("gradient_clipping", 0.0) == cfg.get("gradient_clipping", 0.0)
    clipped = tmp_path / "clipped.json"
    clipped.write_text(json.dumps({**load(ROOT / "ds_configs" / "igpt-s.json"), "gradient_clipping": 1.0}))
    assert load_ds_config(str(clipped), 8).config["gradient_clipping"] == 1.0
