"""The CLI's own checks and records: a spec key a stage would not read, a calibration tokenized
for another model, an allocation for another target under --nm, and what the provenance
records (the resolved dtype, the threads used)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from ecoflap.cli import main


def _layout_and_allocation(tiny_dir, tmp_path, target="0.5"):
    from ecoflap.models.layout import layout_of_folder

    (tmp_path / "layout.json").write_text(json.dumps(layout_of_folder(tiny_dir)))
    out = tmp_path / f"alloc{target}.json"
    main(["allocate", "--layout", str(tmp_path / "layout.json"), "--target", target, "--out", str(out)])
    return out


def test_calibrate_refuses_a_spec_key_it_does_not_read(tiny_dir, tmp_path, caplog):
    """A typo'd n_sample built the default 128 windows; a spec's seed was not applied (--seed was)
    but the provenance recorded it as the seed."""
    out = tmp_path / "calib.safetensors"
    base = ["calibrate", "--model", str(tiny_dir), "--seq-len", "16", "--seed", "0", "--out", str(out)]
    for spec, message in {'{"n_sample": 2}': "'n_sample' (unknown)", '{"n_samples": 2, "seed": 5}': "pass --seed 5"}.items():
        caplog.clear()
        with pytest.raises(SystemExit):
            main([*base, "--spec", spec])
        assert message in caplog.text and not out.exists(), spec


def test_evaluate_refuses_a_spec_key_its_task_does_not_read(tiny_dir, tmp_path, caplog):
    """max_window (for max_windows) ran every window of the text and was recorded as if it had worked."""
    out = tmp_path / "ppl.json"
    with pytest.raises(SystemExit):
        main(["evaluate", "--model", str(tiny_dir), "--task", "perplexity", "--device", "cpu",
              "--spec", '{"seq_len": 16, "max_window": 2}', "--out", str(out)])
    assert "'max_window' (unknown)" in caplog.text and not out.exists()
    caplog.clear()
    with pytest.raises(SystemExit):
        main(["evaluate-text", "--model", str(tiny_dir), "--device", "cpu", "--spec",
              '{"perplexity": {"seq_len": 16, "max_windows": 2, "tasks": ["x"]}}', "--out-dir", str(tmp_path / "ev")])
    assert "'tasks' (unknown)" in caplog.text and not (tmp_path / "ev").exists()


def test_a_calibration_tokenized_for_another_model_is_refused(tiny_dir, tmp_path, caplog):
    """Token ids from another tokenizer mean other tokens: scoring and pruning ran on them silently."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from ecoflap.data.corpora import embedded_text

    calib = tmp_path / "calib.safetensors"
    main(["calibrate", "--model", str(tiny_dir), "--n-samples", "2", "--seq-len", "16", "--out", str(calib)])
    other = tmp_path / "other"
    shutil.copytree(tiny_dir, other)
    bpe = ByteLevelBPETokenizer()  # as many tokens as the model's, other merges
    bpe.train_from_iterator([embedded_text("austen-emma")[60_000:90_000]], vocab_size=384, min_frequency=2,
                            special_tokens=["<pad>", "<s>", "</s>"], show_progress=False)
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(other)
    alloc = _layout_and_allocation(tiny_dir, tmp_path)
    with pytest.raises(SystemExit):
        main(["prune", "--model", str(other), "--device", "cpu", "--calibration", str(calib), "--allocation",
              str(alloc), "--spec", '{"pruner": "wanda"}', "--out", str(tmp_path / "p"), "--report",
              str(tmp_path / "p.json")])
    assert "tokenized with another tokenizer" in caplog.text and not (tmp_path / "p.json").exists()
    main(["prune", "--model", str(tiny_dir), "--device", "cpu", "--calibration", str(calib), "--allocation",
          str(alloc), "--spec", '{"pruner": "wanda"}', "--out", str(tmp_path / "p"), "--report", str(tmp_path / "p.json")])


def test_nm_with_an_allocation_for_another_target_is_refused(tiny_dir, tmp_path, caplog):
    """--nm 2:4 prunes half of every layer; the report recorded the allocation's 0.7 as its target."""
    alloc = _layout_and_allocation(tiny_dir, tmp_path, "0.7")
    report = tmp_path / "p.json"
    with pytest.raises(SystemExit):
        main(["prune", "--model", str(tiny_dir), "--device", "cpu", "--allocation", str(alloc), "--nm", "2:4",
              "--spec", '{"pruner": "magnitude"}', "--out", str(tmp_path / "p"), "--report", str(report)])
    assert "made for target 0.7" in caplog.text and "--target 0.5" in caplog.text and not report.exists()


def test_provenance_records_the_dtype_and_threads_that_ran(tiny_dir, tmp_path):
    """dtype auto was recorded as "auto" (bf16 or fp16 on a GPU, fp32 on a CPU), and a spec's
    threads (a methods: entry given whole) were recorded but not applied."""
    alloc = _layout_and_allocation(tiny_dir, tmp_path)
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    try:
        main(["prune", "--model", str(tiny_dir), "--allocation", str(alloc), "--spec",
              json.dumps({"pruner": "magnitude", "threads": want}), "--out", str(tmp_path / "p"),
              "--report", str(tmp_path / "p.json")])
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    result = json.loads((tmp_path / "p.json").read_text())
    config = result["provenance"]["config"]
    assert used == want and config["threads"] == want and result["runtime"]["threads"] == want
    assert config["dtype"] == "float32" and config["device"] == "cpu" and config["offload"] == "none"
    assert config["requested"] == {"device": "auto", "dtype": "auto"}


def test_evaluate_text_records_each_entrys_own_peak_memory(tiny_dir, tmp_path, monkeypatch):
    """The entries share one process and one loaded model: the second entry's peak included
    whatever the first had held at its own peak."""
    import numpy as np

    from ecoflap import cli

    def evaluation(name, entry, *args):
        if name == "perplexity":  # a transient 400 MB, freed before the next entry
            np.ones(400 * 2**20 // 8).sum()
        return {"value": 1.0}

    monkeypatch.setattr(cli, "_text_evaluation", evaluation)
    main(["evaluate-text", "--model", str(tiny_dir), "--device", "cpu", "--offload", "auto", "--out-dir",
          str(tmp_path), "--spec", json.dumps({"perplexity": {}, "lm_eval": {}})])
    results = [json.loads((tmp_path / f"{n}.json").read_text()) for n in ("perplexity", "lm_eval")]
    first, second = (r["runtime"]["peak_mem_mb"] for r in results)
    assert first - second > 300, (first, second)
    for result in results:  # what ran, as every other stage records it ("auto" was recorded as such)
        config = result["provenance"]["config"]
        assert config["offload"] == "none" and config["dtype"] == "float32", config
        assert config["requested"] == {"offload": "auto", "dtype": "auto"}, config
