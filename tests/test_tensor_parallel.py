"""TP = 2 against TP = 1 with the same weights, on 2 real gloo ranks."""
import pytest
import torch

from igpt_ds.config import get_preset
from igpt_ds.model.losses import bert_mask, compute_loss
from igpt_ds.model.transformer import IGPTModel, tp_split
from igpt_ds.parallel import layout as parallel
from igpt_ds.parallel.weights import full_state_dict, load_full_state_dict, shard, unshard
from igpt_ds.testing import run_ranks

TOL = 1e-5  # fp32: TP only reorders sums (partial products all-reduced), errors are ~1e-7

VARIANTS = {
    "ar": {},
    "bert": {"objective": "bert"},
    "released": {"norm": "rmsnorm", "activation": "quick_gelu", "bias": False},
}


def reference(variant):
    cfg = get_preset("igpt-tiny", resolution=8, **variant)
    torch.manual_seed(0)
    model = IGPTModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():  # make the zero-initialised parts non-trivial
            if name.endswith("bias") or "head" in name:
                p.normal_(std=0.1)
    tokens = torch.randint(0, 512, (3, cfg.seq_len), generator=torch.Generator().manual_seed(1))
    mask = bert_mask(tokens.shape, 0.15, torch.Generator().manual_seed(2)) if cfg.objective == "bert" else None
    out = compute_loss(model, tokens, mask)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return cfg, full_state_dict(model), tokens, mask, model(tokens, mask).detach(), out.loss.item(), grads


def tp_rank_body(rank, world, cfg, weights, tokens, mask):
    state = parallel.initialize(tensor_parallel=world, model=cfg)
    model = IGPTModel(cfg, state.tp_group)
    load_full_state_dict(model, weights)
    out = compute_loss(model, tokens, mask)
    out.loss.backward()
    logits = model(tokens, mask).detach()
    # Gather every gradient to the full layout, with the same rule as the weights.
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        if getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(g) for _ in range(world)]
            torch.distributed.all_gather(parts, g.contiguous(), group=state.tp_group)
            g = unshard(parts, p.partition_dim, p.partition_stride)
        grads[name] = g
    local_shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    return logits, out.loss.item(), grads, local_shapes, full_state_dict(model)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_tp2_matches_tp1(name):
    cfg, weights, tokens, mask, ref_logits, ref_loss, ref_grads = reference(VARIANTS[name])
    results = run_ranks(tp_rank_body, 2, cfg, weights, tokens, mask)
    for rank, (logits, loss, grads, shapes, gathered) in enumerate(results):
        assert loss == pytest.approx(ref_loss, abs=TOL)
        torch.testing.assert_close(logits, ref_logits, rtol=0, atol=TOL)
        assert set(grads) == set(ref_grads)
        for pname, g in grads.items():
            torch.testing.assert_close(g, ref_grads[pname], rtol=0, atol=TOL, msg=f"rank {rank} grad {pname}")
        # Each rank holds half of the sharded weights: half the heads, half the MLP, half the vocab.
        assert shapes["blocks.0.attn.qkv.weight"] == (3 * cfg.d_model // 2, cfg.d_model)
        assert shapes["blocks.0.mlp.proj.weight"] == (cfg.d_model, cfg.d_ff // 2)
        assert shapes["embed.wte.weight"] == (cfg.vocab_size // 2, cfg.d_model)
        for pname, w in gathered.items():
            assert torch.equal(w, weights[pname]), pname


def test_shard_unshard_round_trip_with_stride():
    full = torch.arange(24.0).view(12, 2)
    parts = [shard(full, 0, 3, r, 2) for r in range(2)]
    # rows [q0 q1 | k0 k1 | v0 v1] (2 rows each): rank 0 gets q0, k0, v0
    assert parts[0][:, 0].tolist() == [0, 2, 8, 10, 16, 18]
    assert torch.equal(unshard(parts, 0, 3), full)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_tp_split_table_agrees_with_the_layers(name):
    """The checkpoint file reader splits by name (files carry no attributes): the table must say what
    megatron-core's layers set on every parameter."""
    model = IGPTModel(get_preset("igpt-tiny", resolution=8, **VARIANTS[name]))
    for pname, p in model.named_parameters():
        attrs = (p.partition_dim, p.partition_stride) if getattr(p, "tensor_model_parallel", False) else None
        assert tp_split(pname) == attrs, pname


def test_tp_not_dividing_heads_is_refused_on_every_rank():
    cfg = get_preset("igpt-tiny", n_head=2)
    with pytest.raises(RuntimeError, match="tensor-parallel size 4 does not divide n_head=2"):
        run_ranks(_init_only, 4, cfg)


def _init_only(rank, world, cfg):
    parallel.initialize(tensor_parallel=world, model=cfg)
