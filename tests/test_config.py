import pytest

from igpt_ds.config import PRESETS, ModelConfig, get_preset
from igpt_ds.model.transformer import IGPTModel

# Chen et al. (2020), Section 3: parameter counts of the four sizes.
PAPER_PARAMS = {"igpt-s": 76e6, "igpt-m": 455e6, "igpt-l": 1362e6, "igpt-xl": 6801e6}
PAPER_SHAPES = {"igpt-s": (24, 512, 32), "igpt-m": (36, 1024, 32), "igpt-l": (48, 1536, 32), "igpt-xl": (60, 3072, 64)}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_preset_matches_paper(name):
    cfg = get_preset(name)
    assert (cfg.n_layer, cfg.d_model, cfg.resolution) == PAPER_SHAPES[name]
    n = cfg.num_parameters()
    assert abs(n - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.01, (name, n)


@pytest.mark.parametrize("variant", [
    {},
    {"objective": "bert"},
    {"norm": "rmsnorm", "activation": "quick_gelu", "bias": False},
    {"resolution": 16, "n_layer": 3},
])
def test_tiny_analytic_count_equals_real(variant):
    cfg = get_preset("igpt-tiny", **variant)
    model = IGPTModel(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters()


def test_tiny_is_mr32_and_resolution_overridable():
    assert get_preset("igpt-tiny").seq_len == 32 * 32
    assert get_preset("igpt-l", resolution=48).seq_len == 48 * 48
    assert set(PRESETS) == {"igpt-tiny", "igpt-s", "igpt-m", "igpt-l", "igpt-xl"}


def test_unknown_preset_and_fields():
    with pytest.raises(ValueError, match="unknown model preset 'igpt-q'"):
        get_preset("igpt-q")
    with pytest.raises(ValueError, match="unknown model config field"):
        ModelConfig.from_dict({"n_layer": 1, "d_model": 8, "n_head": 2, "width": 3})


def test_config_round_trips_through_dict():
    cfg = get_preset("igpt-s", objective="bert", norm="rmsnorm")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("fields, tp, message", [
    ({"n_head": 3}, 1, "n_head=3 does not divide d_model=128"),
    ({}, 8, "tensor-parallel size 8 does not divide n_head=4"),
    ({"n_head": 8, "vocab_size": 500}, 8, "tensor-parallel size 8 does not divide vocab_size=500"),
    ({"bert_mask_prob": 1.5}, 1, "bert_mask_prob=1.5"),
    ({"norm": "batchnorm"}, 1, "norm='batchnorm'"),
])
def test_bad_config_is_refused_before_compute(fields, tp, message):
    cfg = get_preset("igpt-tiny", **fields)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        cfg.validate(tensor_parallel=tp)
    if tp == 1:  # the model refuses it at construction, before allocating anything
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            IGPTModel(cfg)


def test_flops_formula_is_6n_plus_attention():
    cfg = get_preset("igpt-s")
    n = cfg.num_parameters(include_embeddings=False)
    assert cfg.train_flops_per_token() == 6 * n + 12 * 24 * 512 * 1024
