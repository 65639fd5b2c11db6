"""NaN / Inf stop the job with a message naming the stage and block, instead of a broken mask."""
import pytest
import torch

from conftest import uniform_per_layer
from ecoflap.models.base import model_layout
from ecoflap.pruning.engine import prune_sequential
from ecoflap.pruning.methods import make_pruner
from ecoflap.scoring.first_order import first_order_scores
from ecoflap.scoring.zeroth_order import zeroth_order_scores

CPU = torch.device("cpu")


def _poison(model, adapter, block=1):
    with torch.no_grad():
        adapter.blocks(model)[block].mlp.up_proj.weight[0, 0] = float("nan")


def test_zeroth_order_names_the_block(tiny, calib_batches):
    """Block-input reuse runs the dense model block by block first: the block whose outputs are
    not finite is named there; without reuse, the first unit whose estimate is not finite."""
    model, _tok, adapter = tiny
    _poison(model, adapter)
    with pytest.raises(FloatingPointError, match=r"model.layers.1 outputs.*float32"):
        zeroth_order_scores(model, adapter, calib_batches, CPU, granularity="block", reuse_block_inputs=True)
    with pytest.raises(FloatingPointError, match=r"zeroth-order score of model.layers.0 .*eps"):
        zeroth_order_scores(model, adapter, calib_batches, CPU, granularity="block", reuse_block_inputs=False)


def test_first_order_names_the_loss(tiny, calib_batches):
    model, _tok, adapter = tiny
    _poison(model, adapter)
    with pytest.raises(FloatingPointError, match="first-order calibration loss"):
        first_order_scores(model, adapter, calib_batches, CPU)


def test_pruning_names_the_block(tiny, calib_batches):
    model, _tok, adapter = tiny
    _poison(model, adapter, block=1)
    layout = model_layout(model, adapter)
    per_layer = uniform_per_layer(layout, 0.5)
    with pytest.raises(FloatingPointError, match="model.layers.1"):
        prune_sequential(model, adapter, make_pruner("sparsegpt"), per_layer, calib_batches, CPU)
