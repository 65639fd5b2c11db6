"""Encoder-decoder language models (T5 / FlanT5, family seq2seq_lm) on a tiny T5 built in
code: the calibration loss and the block-by-block walk equal the model's own forward, the
lm-eval log-likelihoods equal a direct forward, and the whole workflow runs under Snakemake."""
import json
import pandas as pd
import pytest
import torch
import yaml

from conftest import REPO, build_tokenizer, run_snakemake

CPU = torch.device("cpu")


def build_tiny_t5(vocab_size: int, seed: int = 0):
    """FlanT5's layout at toy size: gated-GELU feed-forward, untied head, relative position bias."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=3,
                   num_decoder_layers=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                   pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)
    model = T5ForConditionalGeneration(cfg)
    with torch.no_grad():  # spread the blocks apart, so that an allocation has something to tell
        for stack in (model.encoder.block, model.decoder.block):
            for i, block in enumerate(stack):
                for p in block.parameters():
                    if p.dim() == 2:
                        p.mul_(1 + 0.5 * i)
    return model.eval()


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_t5")
    tok = build_tokenizer()
    build_tiny_t5(len(tok)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def t5(t5_dir):
    from ecoflap.models.loading import load_model
    from ecoflap.models.registry import adapter_for

    model, tok = load_model(t5_dir, CPU, torch.float32, family="seq2seq_lm")
    return model, tok, adapter_for(model, "seq2seq_lm")


@pytest.fixture(scope="module")
def t5_batches(t5):
    from ecoflap.data.calibration import batches, seq2seq_calibration

    _model, tok, _adapter = t5
    data = seq2seq_calibration(tok, "austen-emma", 8, 32, 0, "ecoflap", 48)
    return batches(data, 4)


def test_registry_and_layout(t5, t5_dir):
    from ecoflap.models.layout import layout_of_folder

    model, _tok, adapter = t5
    assert type(model).__name__ == "T5ForConditionalGeneration"
    assert [s.name for s in adapter.stacks(model)] == ["encoder", "decoder"]
    laid = layout_of_folder(t5_dir)
    assert laid["family"] == "seq2seq_lm"
    assert list(laid["layout"]) == [f"encoder.block.{i}" for i in range(3)] + [f"decoder.block.{i}" for i in range(2)]
    decoder_layers = laid["layout"]["decoder.block.0"]
    assert "decoder.block.0.layer.1.EncDecAttention.q" in decoder_layers  # cross-attention is pruned too
    assert not any("relative_attention_bias" in k or "lm_head" in k for b in laid["layout"].values() for k in b)


def test_ecoflap_protocol_splits_documents_as_the_authors(t5):
    """The first n paragraphs in order, cleaned as BLIP captions, cut at a random character
    into an encoder prefix and a target; padding marked in the mask and at -100."""
    from ecoflap.data.calibration import seq2seq_calibration
    from ecoflap.data.captions import blip_pre_caption
    from ecoflap.data.corpora import embedded_paragraphs

    _model, tok, _adapter = t5
    data = seq2seq_calibration(tok, "austen-emma", 4, 32, 0, "ecoflap", 512)
    first = blip_pre_caption(embedded_paragraphs("austen-emma")[0])
    prefix = tok.decode(data["input_ids"][0][data["attention_mask"][0].bool()])
    target = tok.decode(data["labels"][0][data["labels"][0] != -100])
    assert prefix + target == first and 1 <= len(prefix) <= len(first) // 2
    assert ((data["input_ids"] == tok.pad_token_id) == (data["attention_mask"] == 0)).all()
    again = seq2seq_calibration(tok, "austen-emma", 4, 32, 0, "ecoflap", 512)
    other = seq2seq_calibration(tok, "austen-emma", 4, 32, 1, "ecoflap", 512)
    assert torch.equal(again["labels"], data["labels"]) and not torch.equal(other["labels"], data["labels"])
    windows = seq2seq_calibration(tok, "austen-emma", 4, 32, 0, "caption", 512)
    assert windows["input_ids"].shape == (4, 16 + 1) and (windows["labels"][:, -1] == tok.eos_token_id).all()


def test_calibration_loss_is_the_models_own(t5, t5_batches):
    model, _tok, adapter = t5
    batch = t5_batches[0]
    own = model(**batch).loss
    assert torch.equal(adapter.loss(model, batch), own)
    # padding changes nothing: the same samples padded wider give the same loss
    wide = {"input_ids": torch.nn.functional.pad(batch["input_ids"], (0, 5), value=0),
            "attention_mask": torch.nn.functional.pad(batch["attention_mask"], (0, 5), value=0),
            "labels": torch.nn.functional.pad(batch["labels"], (0, 5), value=-100)}
    assert torch.allclose(adapter.loss(model, wide), own, atol=1e-6)


def test_block_walk_reproduces_the_forward(t5, t5_batches):
    """Running the captured inputs through each stack's blocks gives the encoder's and the
    decoder's own hidden states: the relative position bias and the cross-attention inputs
    reach every block (the authors' catcher passes block 0's bias, None, to every block)."""
    from ecoflap.blocks.walk import walk_stack

    model, _tok, adapter = t5
    batch = t5_batches[0]
    out = model(**batch, output_hidden_states=True)
    enc_stack, dec_stack = adapter.stacks(model)
    for stack, final_norm, expected in ((enc_stack, model.encoder.final_layer_norm, out.encoder_last_hidden_state),
                                        (dec_stack, model.decoder.final_layer_norm, out.decoder_hidden_states[-1])):
        hidden = None
        for step in walk_stack(model, adapter, stack, [batch], CPU, desc=None):
            if step.last:
                hidden = step.block(step.inputs[0].hidden, *step.inputs[0].args, **step.inputs[0].kwargs)[0]
        assert torch.allclose(final_norm(hidden), expected, rtol=1e-5, atol=1e-4), stack.name  # float rounding


def test_blockwise_gradients_equal_the_full_backward(t5, t5_batches):
    """The checkpointed scorer's exact gradients, recomputed stack by stack and block by
    block, equal one backward pass through the whole model: the decoder's gradient reaches
    the encoder through every cross-attention."""
    from ecoflap.scoring.checkpointed import checkpointed_gradient_scores
    from ecoflap.scoring.first_order import first_order_scores

    model, _tok, adapter = t5
    full = first_order_scores(model, adapter, t5_batches, CPU, "layer", "abs_wg")
    blockwise = checkpointed_gradient_scores(model, adapter, t5_batches, CPU, "layer", "abs_wg")
    assert set(full) == set(blockwise) and any(k.startswith("encoder.") for k in full)
    for name in full:
        assert blockwise[name] == pytest.approx(full[name], rel=1e-4), name


def test_lm_eval_loglikelihoods_equal_a_direct_forward(t5):
    """lm-eval's seq2seq scoring of a continuation is the decoder's log-probability of its
    tokens given the context in the encoder, as the model's own forward gives it."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tok, _adapter = t5
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4)
    assert lm.backend == "seq2seq"
    pairs = [("It is all around us and our only", " chance"), ("Emma was", " very clever indeed")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
                           disable_tqdm=True)
    for (context, continuation), (logp, _greedy) in zip(pairs, got):
        ctx = torch.tensor([tok(context).input_ids])
        cont = torch.tensor([tok(continuation, add_special_tokens=False).input_ids])
        with torch.no_grad():
            logits = model(input_ids=ctx, labels=cont).logits
        direct = torch.log_softmax(logits.double(), -1)[0].gather(-1, cont[0, :, None]).sum().item()
        assert logp == pytest.approx(direct, abs=1e-4)


def test_config_checks_for_the_family():
    from ecoflap.config import ConfigError, validate_config

    cfg = yaml.safe_load((REPO / "config/paper/flant5_mmlu.yaml").read_text())
    validate_config(cfg)
    cfg["methods"]["ecoflap_zo_wanda"]["scorer"] = "zo_reuse"
    cfg["scorers"]["zo_reuse"] = {"kind": "zeroth_order", "reuse_block_inputs": True}
    with pytest.raises(ConfigError, match="several stacks"):
        validate_config(cfg)


def t5_workflow_config(model_dir):
    return {
        "models": {"t5": {"source": "local", "path": str(model_dir), "family": "seq2seq_lm"}},
        "device": "cpu", "dtype": "float32", "threads": 1, "seed": 0, "sparsities": [0.5],
        "calibration": {"source": "austen-emma", "n_samples": 8, "protocol": "ecoflap", "max_txt_len": 48},
        "scorers": {"zo": {"kind": "zeroth_order", "granularity": "block", "perturb": "tensor",
                           "reuse_block_inputs": False, "n_samples": 4, "batch_size": 4}},
        "methods": {
            "dense": {"pruner": "none"},
            "wanda": {"pruner": "wanda"},
            "sparsegpt": {"pruner": "sparsegpt"},
            "ecoflap_zo_wanda": {"pruner": "wanda", "allocation": "ecoflap", "scorer": "zo", "aggregation": "avg"},
        },
        "pruning": {"n_samples": 8, "batch_size": 4},
        "evaluation": {"lm_eval": {"tasks": ["brown_cloze"], "limit": 16, "batch_size": 8}},
    }


def test_workflow_end_to_end(t5_dir, tmp_path):
    (tmp_path / "t5.yaml").write_text(yaml.safe_dump(t5_workflow_config(t5_dir)))
    out = run_snakemake(tmp_path, tmp_path / "t5.yaml", "--cores", "2")
    assert out.returncode == 0, out.stderr[-4000:]
    table = pd.read_csv(tmp_path / "results/t5/summary/summary.csv")
    assert set(table["method"]) == {"dense", "wanda", "sparsegpt", "ecoflap_zo_wanda"}
    pruned = table[table["method"] != "dense"]
    assert (pruned["achieved_sparsity"].sub(0.5).abs() < 5e-3).all()
    assert table["brown_cloze acc"].between(0, 1).all()
    alloc = json.loads((tmp_path / "results/t5/ecoflap_zo_wanda/0.5/allocation.json").read_text())
    ratios = alloc["unit_sparsity"]
    assert set(ratios) == {f"encoder.block.{i}" for i in range(3)} | {f"decoder.block.{i}" for i in range(2)}
    assert max(ratios.values()) - min(ratios.values()) > 0.005
    report = json.loads((tmp_path / "results/t5/wanda/0.5/pruning.json").read_text())
    assert any(k.startswith("decoder.block.1.layer.1.EncDecAttention") for k in report["layer_sparsity"])


def test_a_task_group_reports_its_aggregate_and_every_item():
    """lm-eval's mmlu is a group of groups: its acc is lm-eval's aggregate, its n and its
    per-item correctness (for the interval) gather every subject below it."""
    from ecoflap.evaluation.harness import leaf_tasks, task_metrics

    out = {"results": {"mmlu": {"acc,none": 0.5, "alias": "mmlu"}, "mmlu_stem": {"acc,none": 0.25},
                       "mmlu_abstract_algebra": {"acc,none": 0.0}, "mmlu_anatomy": {"acc,none": 0.5},
                       "mmlu_law": {"acc,none": 1.0}},
           "group_subtasks": {"mmlu": ["mmlu_stem", "mmlu_law"], "mmlu_stem": ["mmlu_abstract_algebra", "mmlu_anatomy"],
                              "mmlu_abstract_algebra": [], "mmlu_anatomy": [], "mmlu_law": []},
           "n-samples": {"mmlu_abstract_algebra": {"effective": 2}, "mmlu_anatomy": {"effective": 2},
                         "mmlu_law": {"effective": 1}}}
    assert leaf_tasks(out, "mmlu") == ["mmlu_abstract_algebra", "mmlu_anatomy", "mmlu_law"]
    assert leaf_tasks(out, "mmlu_law") == ["mmlu_law"]
    assert task_metrics(out, ["mmlu"]) == {"mmlu": {"acc": 0.5, "n": 5}}


def test_paper_config_dry_run_plans_mmlu(tmp_path):
    out = run_snakemake(tmp_path, REPO / "config/paper/flant5_mmlu.yaml", "-n", "-p", "--cores", "1", timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    for row in ("wanda/0.5", "wanda/0.6", "ecoflap_zo_wanda/0.5", "ecoflap_zo_wanda/0.6"):
        assert f"results/flan-t5-xl/{row}/eval/lm_eval.json" in text
    assert '"tasks": ["mmlu"]' in text and '"num_fewshot": 5' in text and '"protocol": "ecoflap"' in text
    assert f"--reference {REPO}/config/paper/published/flant5_mmlu.yaml" in text


def test_encoder_padding_never_reaches_the_cross_attention_statistics(t5_dir, t5_batches):
    """The decoder's cross-attention k and v read the encoder's states, padding included: changing
    only the ids at padded encoder positions changed their Wanda masks (the decoder's labels mask
    does not fit those states, or, at equal lengths, marks the wrong positions)."""
    from ecoflap.models.base import model_layout
    from ecoflap.models.loading import load_model
    from ecoflap.models.registry import adapter_for
    from ecoflap.pruning.engine import prune_sequential
    from ecoflap.pruning.methods import make_pruner
    from conftest import uniform_per_layer

    assert all((b["attention_mask"] == 0).any() for b in t5_batches)  # the ecoflap protocol pads the prefixes
    other = [dict(b, input_ids=b["input_ids"].masked_fill(b["attention_mask"] == 0, 7)) for b in t5_batches]
    equal = [dict(b, labels=b["labels"][:, :b["input_ids"].shape[1]]) for b in t5_batches]
    equal = [dict(b, labels=torch.cat([b["labels"], torch.full((b["labels"].shape[0],
                                                                b["input_ids"].shape[1] - b["labels"].shape[1]), -100)],
                                      1)) for b in equal]  # decoder as long as the encoder
    equal_other = [dict(b, input_ids=b["input_ids"].masked_fill(b["attention_mask"] == 0, 7)) for b in equal]
    hashes = {}
    for name, data in (("padded", t5_batches), ("other padding", other), ("equal", equal),
                       ("equal, other padding", equal_other)):
        model, _ = load_model(t5_dir, CPU, torch.float32, family="seq2seq_lm")
        adapter = adapter_for(model, "seq2seq_lm")
        report = prune_sequential(model, adapter, make_pruner("wanda"),
                                  uniform_per_layer(model_layout(model, adapter), 0.5), data, CPU)
        hashes[name] = report.mask_sha256
    assert hashes["padded"] == hashes["other padding"]
    assert hashes["equal"] == hashes["equal, other padding"]
