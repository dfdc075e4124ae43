import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from igpt_ds.config import get_preset
from igpt_ds.model.losses import bert_mask, bits_per_dim, compute_loss
from igpt_ds.model.transformer import IGPTModel

ROOT = Path(__file__).resolve().parents[1]


def small_model(seed=0, **overrides):
    """igpt-tiny at 8x8 with every weight random (incl. the zero-initialised head)."""
    cfg = get_preset("igpt-tiny", resolution=8, **overrides)
    torch.manual_seed(seed)
    model = IGPTModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "head" in name:
                p.normal_(std=0.1)
    return model


def tokens_for(cfg, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), generator=g)


def test_initial_loss_is_uniform_over_palette():
    cfg = get_preset("igpt-tiny", resolution=8)
    model = IGPTModel(cfg)  # zero-initialised head: every logit 0
    out = compute_loss(model, tokens_for(cfg))
    assert out.loss.item() == pytest.approx(math.log(512), abs=1e-6)
    assert bits_per_dim(out.loss.item()) == pytest.approx(9 / 3, abs=1e-6)  # 9 bits per pixel, 3 dims


@pytest.mark.parametrize("variant", [{}, {"norm": "rmsnorm", "activation": "quick_gelu", "bias": False}])
def test_ar_causality(variant):
    model = small_model(**variant).eval()
    tokens = tokens_for(model.cfg)
    base = model(tokens)
    for j in (0, 17, model.cfg.seq_len - 1):
        changed = tokens.clone()
        changed[:, j] = (changed[:, j] + 1) % 512
        out = model(changed)
        # Logits at positions <= j predict pixels <= j and must not see pixel j.
        assert torch.equal(out[:, : j + 1], base[:, : j + 1]), j
        if j + 1 < model.cfg.seq_len:
            assert not torch.allclose(out[:, j + 1:], base[:, j + 1:]), j


def test_bert_mask_rate_within_sampling_error():
    p, shape = 0.15, (64, 1024)
    mask = bert_mask(shape, p, generator=torch.Generator().manual_seed(0))
    n = mask.numel()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(mask.float().mean().item() - p) < 4 * sigma
    assert mask.any(dim=1).all()
    assert bert_mask((4, 3), 0.01, generator=torch.Generator().manual_seed(0)).any(dim=1).all()


def test_bert_loss_only_on_masked_positions_and_masked_content_zeroed():
    model = small_model(objective="bert").eval()
    cfg = model.cfg
    tokens = tokens_for(cfg)
    mask = bert_mask(tokens.shape, cfg.bert_mask_prob, generator=torch.Generator().manual_seed(3))
    # Masked content is zeroed: the embedding at a masked position is the position embedding alone.
    h0 = model.hidden_states(tokens, mask)[0]
    pos = model.embed.wpe.weight[: cfg.seq_len].expand_as(h0)
    assert torch.equal(h0[mask], pos[mask])
    assert not torch.allclose(h0[~mask], pos[~mask])
    # ... so what a masked position held cannot change any output.
    other = torch.where(mask, (tokens + 7) % 512, tokens)
    assert torch.equal(model(other, mask), model(tokens, mask))
    # No attention mask: every position sees every unmasked position.
    flipped = tokens.clone()
    j = int((~mask[0]).nonzero()[-1])
    flipped[0, j] = (flipped[0, j] + 1) % 512
    assert not torch.allclose(model(flipped, mask)[0, 0], model(tokens, mask)[0, 0])
    # Loss only on masked positions: gradient w.r.t. logits is zero elsewhere.
    logits = model(tokens, mask).detach().requires_grad_(True)
    from igpt_ds.model.losses import token_losses
    losses = token_losses(logits, tokens)
    ((losses * mask).sum() / mask.sum()).backward()
    assert torch.count_nonzero(logits.grad[~mask]) == 0
    assert torch.count_nonzero(logits.grad[mask]) > 0
    out = compute_loss(model, tokens, mask)
    ref = torch.nn.functional.cross_entropy(model(tokens, mask)[mask], tokens[mask])
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert out.num_tokens == int(mask.sum())
    with pytest.raises(ValueError, match="needs a mask"):
        compute_loss(model, tokens)


# bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%); through 4 blocks the logits drift by a few
# of those steps. Stated tolerance: max |bf16 - fp32| <= 0.05 * max |fp32| and mean error <= 0.01 * it.
BF16_MAX_REL, BF16_MEAN_REL = 0.05, 0.01


@pytest.mark.parametrize("variant", [{}, {"norm": "rmsnorm", "activation": "quick_gelu", "bias": False}])
def test_bf16_forward_close_to_fp32(variant):
    model = small_model(**variant).eval()
    tokens = tokens_for(model.cfg)
    ref = model(tokens)
    low = model.to(torch.bfloat16)(tokens).float()
    scale = ref.abs().max().item()
    err = (low - ref).abs()
    assert err.max().item() <= BF16_MAX_REL * scale, (err.max().item(), scale)
    assert err.mean().item() <= BF16_MEAN_REL * scale
    assert compute_loss(model, tokens).loss.dtype == torch.float32


def test_activation_checkpointing_gives_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = small_model(activation_checkpointing=ckpt).train()
        compute_loss(model, tokens_for(model.cfg)).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("make_tokens, message", [
    (lambda: torch.tensor([[0, 512, 3]]), "token id 512 outside 0..511"),
    (lambda: torch.tensor([[0, -1, 3]]), "token id -1 outside 0..511"),
    (lambda: torch.zeros(1, 65, dtype=torch.long), "sequence length 65 exceeds the model's 64"),
    (lambda: torch.zeros(1, 4), "integer palette ids"),
    (lambda: torch.zeros(4, dtype=torch.long), r"\[batch, seq\]"),
])
def test_bad_tokens_refused_before_compute(make_tokens, message, monkeypatch):
    model = small_model()
    calls = []
    monkeypatch.setattr(model.embed, "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match=message):
        model(make_tokens())
    assert not calls  # nothing was computed


def test_plain_python_process_without_launcher():
    code = (
        "import torch, igpt_ds\n"
        "from igpt_ds.model.transformer import IGPTModel\n"
        "m = IGPTModel(igpt_ds.get_preset('igpt-tiny', resolution=4))\n"
        "print(tuple(m(torch.zeros(2, 16, dtype=torch.long)).shape))\n"
    )
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "(2, 16, 512)"
