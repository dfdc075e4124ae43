import pytest

from igpt_ds.config import get_preset
from igpt_ds.parallel.layout import ParallelLayout


def test_rank_order_tp_fastest_then_dp_then_pp():
    layout = ParallelLayout(world_size=8, tensor_parallel=2, pipeline_parallel=2)
    assert layout.data_parallel == 2
    coords = [layout.coords(r) for r in range(8)]  # (dp, tp, pp)
    assert coords == [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0), (0, 0, 1), (0, 1, 1), (1, 0, 1), (1, 1, 1)]


@pytest.mark.parametrize("layout, zero, model, message", [
    (ParallelLayout(6, 4, 1), 0, None, "world size 6 is not divisible by TP x PP = 4 x 1 = 4"),
    (ParallelLayout(4, 1, 2), 3, None, "ZeRO stage 3 cannot be combined with pipeline parallelism"),
    (ParallelLayout(4, 1, 2), 2, None, "Use a zero1_pipe_"),
    (ParallelLayout(8, 8, 1), 0, get_preset("igpt-tiny"), "tensor-parallel size 8 does not divide n_head=4"),
    (ParallelLayout(8, 1, 8), 0, get_preset("igpt-tiny"), "pipeline-parallel size 8 exceeds n_layer=4"),
])
def test_impossible_layouts_name_the_fix(layout, zero, model, message):
    with pytest.raises(ValueError, match=message):
        layout.validate(model, zero_stage=zero)


def test_possible_layouts_pass():
    ParallelLayout(8, 2, 2).validate(get_preset("igpt-s"), zero_stage=1)
    ParallelLayout(8, 8, 1).validate(get_preset("igpt-s"), zero_stage=3)
