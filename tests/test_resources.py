"""Job resources from the model's size (ecoflap/utils/resources.py), against hand-worked numbers."""
import json

import pytest

from ecoflap.utils.resources import GIB, estimate, layout_counts, model_size, score_passes

B = 10**9


def test_llama7b_on_a_gpu_by_hand():
    # 6.74 B parameters, 6.48 B of them prunable in 32 blocks, bf16, 128 x 2048 calibration tokens
    params, prunable, blocks, tokens = 6_740_000_000, 6_476_000_000, 32, 128 * 2048
    w = params * 2
    none = estimate("prune", params, prunable, blocks, "bfloat16", True, "none", tokens, "wanda")
    assert none["mem_mb"] == -(-(w + 3 * GIB) // 2**20)  # weights load on the host first, + 3 GiB
    assert none["gpu_mem_mb"] == -(-int(w * 1.3 + 2 * GIB) // 2**20)
    assert none["runtime"] == -(-(10 + 4.0 * 6.74 * 0.262144) // 1)  # 10 min + 4 min per B params per M tokens
    cpu = estimate("prune", params, prunable, blocks, "bfloat16", True, "cpu", tokens, "wanda")
    outside, block = (params - prunable) * 2, prunable * 2 / blocks
    assert cpu["gpu_mem_mb"] == -(-int(outside + 2 * block * 1.3 + 2 * GIB) // 2**20)
    assert cpu["gpu_mem_mb"] < none["gpu_mem_mb"] / 5  # one block (two during a backward) instead of 32
    disk = estimate("prune", params, prunable, blocks, "bfloat16", True, "disk", tokens, "wanda")
    assert disk["gpu_mem_mb"] == cpu["gpu_mem_mb"]
    assert disk["mem_mb"] == -(-int(outside + 2 * block * 1.6 + 3 * GIB) // 2**20)  # host: one block, not 13 GB
    assert disk["mem_mb"] < cpu["mem_mb"] / 2
    assert estimate("prune", params, prunable, blocks, "bfloat16", True, "none", tokens, "sparsegpt")["runtime"] > \
        none["runtime"]


def test_cpu_jobs_retries_and_stages():
    args = (135_000_000, 106_000_000, 30, "float32", False, "none", 64 * 128)
    score, prune, evaluate = (estimate(s, *args) for s in ("score", "prune", "evaluate"))
    assert score["mem_mb"] > prune["mem_mb"] > evaluate["mem_mb"]  # gradients > a pruner's copy > inference
    assert score["gpu_mem_mb"] == 0
    retry = estimate("prune", *args, attempt=2)
    assert retry["mem_mb"] == pytest.approx(2 * prune["mem_mb"], abs=1) and retry["runtime"] >= 2 * prune["runtime"] - 1
    with pytest.raises(ValueError, match="stage must be one of"):
        estimate("train", *args)


def test_model_size_reads_the_download(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "bfloat16", "num_hidden_layers": 2}))
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 2000)  # 1000 bf16 parameters (header ignored)
    (tmp_path / "layout.json").write_text(json.dumps({"layout": {"b.0": {"b.0.q": 300}, "b.1": {"b.1.q": 300}}}))
    assert model_size(tmp_path, tmp_path / "layout.json") == (1000, 600, 2)


def test_scoring_time_follows_the_scorer(tmp_path):
    """One rate for every scorer gave ATP's search on SmolLM2 (40 prune-and-measure runs, 921 s on
    one thread) an 11-minute SLURM limit; the passes come from its grid and the other scorers'
    measured costs, so each estimate stays above what it took."""
    blocks, layers, targets = 30, 210, [0.5, 0.6, 0.7]
    atp = score_passes({"kind": "atp_search", "step": 0.002}, blocks, layers, blocks, targets)
    assert atp == 1 + 1.5 * (17 + 13 + 10)  # the grid the search ran: 40 runs
    zo = score_passes({"kind": "zeroth_order", "granularity": "block"}, blocks, layers, blocks, targets)
    zo_layers = score_passes({"kind": "zeroth_order", "granularity": "layer", "reuse_block_inputs": False},
                             blocks, layers, blocks, targets)
    assert (zo, zo_layers) == (15, 210)
    assert score_passes({"kind": "first_order"}, blocks, layers, blocks, targets) == 1
    args = (135_000_000, 106_000_000, 30, "float32", False, "none", 16 * 128)
    measured_s = {1.0: 21, zo: 320, atp: 921, 3.0: 61}  # first_order, zeroth_order, atp_search, checkpointed
    for passes, seconds in measured_s.items():
        assert estimate("score", *args, passes=passes)["runtime"] * 60 > seconds
    assert estimate("score", *args, passes=atp)["runtime"] > estimate("score", *args, passes=zo)["runtime"] > \
        estimate("score", *args)["runtime"]
    (tmp_path / "layout.json").write_text(json.dumps({
        "layout": {f"{p}.{i}": {f"{p}.{i}.q": 1, f"{p}.{i}.k": 1} for p in ("v", "t") for i in range(6 if p == "v" else 3)},
        "submodel_of_block": {f"{p}.{i}": p for p in ("v", "t") for i in range(6 if p == "v" else 3)}}))
    assert layout_counts(tmp_path / "layout.json") == (18, 6)
