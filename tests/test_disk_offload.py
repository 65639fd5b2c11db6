"""offload: disk. The model is built without its blocks' weights, each block is read from the
checkpoint's safetensors files when it is reached and dropped afterwards, and pruning writes
each block to its own shard as soon as it is pruned. Every stage must give what the model
loaded whole gives: the same masks (every pruner, unstructured and 2:4), the same scores
(every scorer that allows it), the same perplexity, the same checkpoint bytes."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from conftest import calibration_batches, every_scorer, uniform_per_layer
from ecoflap.models import loading, offload
from ecoflap.models.base import model_layout
from ecoflap.models.loading import load_model
from ecoflap.models.registry import adapter_for

CPU = torch.device("cpu")
FIX = Path(__file__).parent / "fixtures" / "vl"


class DiskTracker:
    """Which blocks hold real weights, as far as the disk homes' onload / offload say."""

    def __init__(self, blocks):
        self.loaded: set[int] = set()
        self.most = 0
        self.reads = 0
        for i, block in enumerate(blocks):
            home = block._ecoflap_home
            assert isinstance(home, offload._DiskHome)
            onload, off = home.onload, home.offload

            def on(b, _i=i, _on=onload):
                self.reads += 1
                self.loaded.add(_i)
                self.most = max(self.most, len(self.loaded))
                return _on(b)

            def away(b, _i=i, _off=off):
                self.loaded.discard(_i)
                return _off(b)
            home.onload, home.offload = on, away


def _disk(folder):
    model, tok = load_model(folder, CPU, torch.float32, offload="disk")
    adapter = adapter_for(model)
    return model, tok, adapter, DiskTracker(adapter.blocks(model))


def _batches(tok):
    return calibration_batches(tok)


def _is_stub(t: torch.Tensor) -> bool:
    return t.numel() > 1 and all(s == 0 for s in t.stride())


def test_disk_loading_holds_no_block_weights_and_computes_the_same_logits(tiny_dir):
    whole, tok = load_model(tiny_dir, CPU, torch.float32)
    model, _tok, adapter, tracker = _disk(tiny_dir)
    assert all(_is_stub(p) for b in adapter.blocks(model) for p in b.parameters())
    assert not any(_is_stub(p) for p in model.model.embed_tokens.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    ids = torch.randint(0, len(tok), (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, whole(input_ids=ids).logits)
    assert tracker.most == 1 and tracker.loaded == set()
    assert all(_is_stub(p) for b in adapter.blocks(model) for p in b.parameters())  # dropped again


@pytest.mark.parametrize("pruner_name,nm", [("wanda", None), ("sparsegpt", None), ("magnitude", None),
                                            ("wanda", (2, 4)), ("sparsegpt", (2, 4))])
def test_disk_pruning_gives_the_same_masks_and_checkpoint(tiny_dir, tmp_path, pruner_name, nm):
    from ecoflap.pruning.checkpoint import PrunedCheckpoint
    from ecoflap.pruning.engine import prune_sequential
    from ecoflap.pruning.methods import make_pruner

    hashes, files = [], []
    for mode in ("none", "disk"):
        if mode == "none":
            model, tok = load_model(tiny_dir, CPU, torch.float32)
            adapter, tracker = adapter_for(model), None
        else:
            model, tok, adapter, tracker = _disk(tiny_dir)
        layout = model_layout(model, adapter)
        per_layer = uniform_per_layer(layout, 0.5)
        out = tmp_path / mode
        out.mkdir()
        written = PrunedCheckpoint(model, adapter, tiny_dir, out)
        report = prune_sequential(model, adapter, make_pruner(pruner_name), per_layer, _batches(tok), CPU, nm,
                                  on_block_pruned=written.write_block)
        written.finish(tok)
        hashes.append(report.mask_sha256)
        files.append({f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.iterdir())
                      if f.is_file()})
        if tracker:
            assert tracker.most == 1 and tracker.loaded == set()
            assert tracker.reads == len(adapter.blocks(model))  # each block read once
    assert hashes[0] == hashes[1]
    assert files[0] == files[1]  # byte for byte, config and index included
    index = json.loads((tmp_path / "disk" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == len(adapter.blocks(model)) + 1
    assert "lm_head.weight" not in index["weight_map"]  # tied: written once, as save_pretrained does
    # transformers loads the sharded folder, and it is the pruned model
    reloaded, _ = load_model(tmp_path / "disk", CPU, torch.float32)
    pruned_none, _ = load_model(tmp_path / "none", CPU, torch.float32)
    for (name, a), (_n, b) in zip(reloaded.state_dict().items(), pruned_none.state_dict().items()):
        assert torch.equal(a, b), name
    q = reloaded.model.layers[0].self_attn.q_proj.weight
    assert (q == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)


def test_disk_pruning_without_a_writer_is_refused(tiny_dir):
    """Unwritten, a disk block's pruned weights would be dropped and read back dense from the
    source: the model would look pruned (the report says 0.5) and evaluate as the dense one."""
    from ecoflap.pruning.engine import prune_sequential
    from ecoflap.pruning.methods import make_pruner

    model, tok, adapter, tracker = _disk(tiny_dir)
    layout = model_layout(model, adapter)
    per_layer = uniform_per_layer(layout, 0.5)
    with pytest.raises(ValueError, match="on_block_pruned=PrunedCheckpoint"):
        prune_sequential(model, adapter, make_pruner("wanda"), per_layer, _batches(tok), CPU)
    assert tracker.reads == 0  # refused before any block was read


def test_disk_scores_equal_the_whole_model(tiny_dir):
    model, tok = load_model(tiny_dir, CPU, torch.float32)
    whole = every_scorer(model, adapter_for(model), _batches(tok))
    model, tok, adapter, tracker = _disk(tiny_dir)
    held = every_scorer(model, adapter, _batches(tok))
    assert held == whole  # bit-identical
    assert tracker.loaded == set()
    assert tracker.most <= 2  # a backward recomputes block j while block j+1's gradients are reduced
    assert all(_is_stub(p) for b in adapter.blocks(model) for p in b.parameters())


def test_disk_perplexity_reads_each_block_once_and_is_identical(tiny_dir):
    from ecoflap.evaluation.perplexity import evaluation_text, perplexity

    text = evaluation_text("brown-heldout")[:20_000]
    model, tok = load_model(tiny_dir, CPU, torch.float32)
    whole = perplexity(model, tok, text, 64, CPU, 8, 4, adapter_for(model))
    model, tok, adapter, tracker = _disk(tiny_dir)
    held = perplexity(model, tok, text, 64, CPU, 8, 4, adapter)
    assert held["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-5)
    assert held["window_nll"] == pytest.approx(whole["window_nll"], rel=1e-5)
    assert tracker.reads == len(adapter.blocks(model))  # block by block: two batches, one read per block


def test_atp_search_refuses_disk_offload(tiny_dir):
    from ecoflap.scoring.atp_search import atp_search_scores

    model, tok, adapter, _tracker = _disk(tiny_dir)
    with pytest.raises(ValueError, match="offload: cpu"):
        atp_search_scores(model, adapter, _batches(tok), CPU, targets=[0.5])


def test_disk_loading_checks_the_config_against_the_weights(tiny_dir, tmp_path):
    import shutil

    folder = tmp_path / "edited"
    shutil.copytree(tiny_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] += 8
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json and the weights disagree: .*mismatched"):
        load_model(folder, CPU, torch.float32, offload="disk")


def test_a_block_that_does_not_fit_host_memory_is_named():
    gb = 10**9
    with pytest.raises(MemoryError, match="block model.layers.1 .*(3.00 GB).*at once, 5.00 GB, and 4.00 GB are available"):
        offload.check_host_fits(2 * gb, {"model.layers.0": gb, "model.layers.1": 3 * gb}, 4 * gb)


@pytest.mark.parametrize("kind", ["blip2_opt", "clip"])
def test_vision_language_disk_pruning(tmp_path, kind):
    """The language stack's inputs are captured through the vision side pruned earlier in the
    same pass: with offload disk those blocks must be read back from the shards just written."""
    import vl_models

    from ecoflap.cli import main

    folder = vl_models.build(kind, tmp_path / "model")
    main(["calibrate", "--model", str(folder), "--source", "cc3m", "--pairs", str(FIX / "cc3m/pairs.tsv"),
          "--image-root", str(FIX / "cc3m"), "--n-samples", "4", "--prompt", "a photo of",
          "--out", str(tmp_path / "calib.safetensors")])
    main(["allocate", "--layout", str(_layout(folder, tmp_path)), "--kind", "uniform", "--target", "0.5",
          "--out", str(tmp_path / "alloc.json")])
    reports = {}
    for mode in ("none", "disk"):
        main(["prune", "--model", str(folder), "--device", "cpu", "--dtype", "float32", "--offload", mode,
              "--calibration", str(tmp_path / "calib.safetensors"), "--allocation", str(tmp_path / "alloc.json"),
              "--pruner", "wanda", "--batch-size", "2", "--out", str(tmp_path / f"pruned_{mode}"),
              "--report", str(tmp_path / f"report_{mode}.json")])
        reports[mode] = json.loads((tmp_path / f"report_{mode}.json").read_text())
    assert reports["disk"]["mask_sha256"] == reports["none"]["mask_sha256"]
    assert reports["disk"]["checkpoint_sha256"] == reports["none"]["checkpoint_sha256"]


def _layout(folder: Path, tmp_path: Path) -> Path:
    from ecoflap.cli import main

    out = tmp_path / "layout.json"
    main(["download", "--spec", json.dumps({"source": "local", "path": str(folder)}), "--out",
          str(tmp_path / "copy"), "--layout", str(out)])
    return out


def test_lm_eval_through_device_map_offloaded_to_disk(tiny_dir, tmp_path):
    """lm-eval and the vision-language tasks with offload on GPUs load through transformers'
    device_map (every GPU, then host memory or the offload folder). On a CPU machine the same
    loader is run with no GPU and host memory for the embeddings only, so the blocks are
    offloaded to disk: the cloze's per-item results equal those of the model loaded whole."""
    from ecoflap.evaluation.harness import run_lm_eval
    from ecoflap.models.loading import load_dispatched

    model, tok = load_model(tiny_dir, CPU, torch.float32)
    whole = run_lm_eval(model, tok, ["brown_cloze"], batch_size=8, limit=24)["brown_cloze"]
    model, tok = load_dispatched(tiny_dir, torch.float32, "disk", tmp_path / "offload", max_memory={"cpu": 100_000})
    assert model.hf_device_map["model.layers"] == "disk" and model.hf_device_map["model.embed_tokens"] == "cpu"
    assert any(p.is_meta for p in model.parameters())  # the weights stay in the safetensors files
    dispatched = run_lm_eval(model, tok, ["brown_cloze"], batch_size=8, limit=24)["brown_cloze"]
    assert dispatched["item_acc"] == whole["item_acc"]
    assert dispatched["acc"] == whole["acc"]


def test_evaluate_text_cli_with_offload_disk(tiny_dir, tmp_path):
    """The evaluation job as the workflow runs it: perplexity block by block, the cloze through
    the onloading forward (on a CPU; device_map on GPUs), the same numbers as offload none."""
    from ecoflap.cli import main

    spec = json.dumps({"perplexity": {"dataset": "brown-heldout", "seq_len": 64, "max_windows": 8, "batch_size": 4},
                       "lm_eval": {"tasks": ["brown_cloze"], "limit": 16, "batch_size": 8}})
    metrics = {}
    for mode in ("none", "disk"):
        main(["evaluate-text", "--model", str(tiny_dir), "--device", "cpu", "--dtype", "float32", "--offload", mode,
              "--spec", spec, "--out-dir", str(tmp_path / mode)])
        metrics[mode] = {name: json.loads((tmp_path / mode / f"{name}.json").read_text())["metrics"]
                         for name in ("perplexity", "lm_eval")}
    assert metrics["disk"]["perplexity"]["perplexity"] == pytest.approx(metrics["none"]["perplexity"]["perplexity"],
                                                                        rel=1e-5)
    assert metrics["disk"]["lm_eval"] == metrics["none"]["lm_eval"]


def _prune_to(folder, out, mode, family, pruner_name="magnitude", batches=()):
    """Prune `folder` (float16) with offload `mode`, written block by block to `out`; the files' hashes."""
    from ecoflap.pruning.checkpoint import PrunedCheckpoint
    from ecoflap.pruning.engine import prune_sequential
    from ecoflap.pruning.methods import make_pruner

    model, _tok = load_model(folder, CPU, torch.float16, offload=mode, family=family)
    adapter = adapter_for(model, family)
    out.mkdir()
    written = PrunedCheckpoint(model, adapter, folder, out)
    prune_sequential(model, adapter, make_pruner(pruner_name), uniform_per_layer(model_layout(model, adapter), 0.5),
                     list(batches), CPU, on_block_pruned=written.write_block)
    written.finish(_tok)
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.iterdir()) if f.is_file()}


def _dtypes(model):
    """Every tensor's dtype (a disk block's stubs carry the dtype its weights are read in)."""
    return {name: t.dtype for name, t in model.state_dict().items()}


def test_disk_keeps_the_float32_modules_of_a_float16_t5(tmp_path, monkeypatch):
    """T5 keeps its `wo` layers in float32 (_keep_in_fp32_modules) when loaded in float16:
    offload disk must load every tensor in the dtype from_pretrained gives it, compute the
    same logits, size the model as loaded, and write the same pruned checkpoint."""
    from test_seq2seq import build_tiny_t5

    from conftest import build_tokenizer
    from ecoflap.data.calibration import batches, seq2seq_calibration
    from ecoflap.models.loading import loaded_bytes
    from ecoflap.models.shards import CheckpointFiles

    tok = build_tokenizer()
    build_tiny_t5(len(tok)).save_pretrained(tmp_path / "t5")
    tok.save_pretrained(tmp_path / "t5")
    models = {mode: load_model(tmp_path / "t5", CPU, torch.float16, offload=mode, family="seq2seq_lm")[0]
              for mode in ("none", "disk")}
    wo = "encoder.block.0.layer.1.DenseReluDense.wo.weight"
    assert _dtypes(models["none"])[wo] == torch.float32  # transformers' rule, which disk must follow
    assert _dtypes(models["disk"]) == _dtypes(models["none"])
    ids = torch.randint(3, len(tok), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = {m: model(input_ids=ids, decoder_input_ids=ids[:, :6]).logits for m, model in models.items()}
    assert torch.equal(logits["none"], logits["disk"])
    as_loaded = {name: t.dtype for name, t in models["none"].state_dict().items()}
    assert loaded_bytes(CheckpointFiles(tmp_path / "t5"), torch.float16, as_loaded) == \
        offload.model_bytes(models["none"])
    # the evaluation's choice between device_map and block onloading sizes the model the same way
    sizes = []
    monkeypatch.setattr(loading, "choose_offload", lambda mode, size, device: sizes.append(size) or "none")
    loading.resolve_offload(tmp_path / "t5", "auto", torch.float16, CPU)
    assert sizes == [offload.model_bytes(models["none"])]
    calibration = batches(seq2seq_calibration(tok, "austen-emma", 8, 32, 0, "ecoflap", 48), 4)
    files = {mode: _prune_to(tmp_path / "t5", tmp_path / mode, mode, "seq2seq_lm", "wanda", calibration)
             for mode in ("none", "disk")}  # wanda: the calibration runs through the float32 `wo` too
    assert files["none"] == files["disk"]


def test_disk_keeps_the_float32_q_former_of_a_float16_blip2(tmp_path):
    """BLIP-2 keeps its query tokens and Q-Former in float32: so must offload disk, outside the
    blocks (query_tokens) and in the blocks it reads (the Q-Former's layers), and the pruned
    checkpoint is the same file for file."""
    import vl_models

    folder = vl_models.build("blip2_opt", tmp_path / "model")
    models = {mode: load_model(folder, CPU, torch.float16, offload=mode)[0] for mode in ("none", "disk")}
    assert models["none"].query_tokens.dtype == torch.float32
    assert _dtypes(models["none"])["qformer.encoder.layer.0.attention.attention.query.weight"] == torch.float32
    assert _dtypes(models["disk"]) == _dtypes(models["none"])
    with offload.resident(models["disk"].qformer.encoder.layer[0]):  # the dtype the block is read in
        assert models["disk"].qformer.encoder.layer[0].attention.attention.query.weight.dtype == torch.float32
    files = {mode: _prune_to(folder, tmp_path / mode, mode, None) for mode in ("none", "disk")}
    assert files["none"] == files["disk"]
