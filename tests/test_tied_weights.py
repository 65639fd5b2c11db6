"""A checkpoint whose config.json ties the LM head to the embeddings (tie_word_embeddings) but
whose files hold a different lm_head.weight: transformers keeps the stored head (a warning
only) while offload: disk ties it, so the same folder would be two models. Every load path
refuses it; a stored head equal to the embeddings (a redundant copy) still loads."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import build_tiny_llama, build_tokenizer
from ecoflap.models.loading import load_dispatched, load_model
from ecoflap.utils.io import write_checksums


def _tied_llama_with_stored_head(out, head):
    """The tiny (tied) LLaMA saved as save_pretrained writes it, plus lm_head.weight = head(embeddings)."""
    tok = build_tokenizer()
    model = build_tiny_llama(len(tok), layers=2)
    assert model.config.tie_word_embeddings
    model.save_pretrained(out)
    tok.save_pretrained(out)
    weights = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in weights  # a tied head is not written
    weights["lm_head.weight"] = head(weights["model.embed_tokens.weight"])
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    write_checksums(out)
    return out


@pytest.mark.parametrize("offload", ["none", "cpu", "disk"])
def test_a_stored_head_that_differs_from_the_tied_embeddings_is_refused(tmp_path, offload):
    folder = _tied_llama_with_stored_head(tmp_path, lambda e: torch.randn_like(e))
    with pytest.raises(ValueError, match=r"tie_word_embeddings.*different lm_head.weight.*"
                                         r"\"tie_word_embeddings\": false in config.json"):
        load_model(folder, torch.device("cpu"), torch.float32, offload=offload)


@pytest.mark.parametrize("offload", ["none", "disk"])
def test_a_stored_copy_of_the_tied_embeddings_loads(tmp_path, offload):
    folder = _tied_llama_with_stored_head(tmp_path, lambda e: e.clone())
    model, _tok = load_model(folder, torch.device("cpu"), torch.float32, offload=offload)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_the_dispatched_load_refuses_it_too(tmp_path):
    """lm-eval's loader (accelerate's device_map), here on host memory alone."""
    folder = _tied_llama_with_stored_head(tmp_path / "model", lambda e: torch.randn_like(e))
    with pytest.raises(ValueError, match="different lm_head.weight"):
        load_dispatched(folder, torch.float32, "cpu", tmp_path / "offload", max_memory={"cpu": 10**9})


def test_a_head_of_its_own_stays_its_own_where_config_json_unties_it(tmp_path):
    """FlanT5's config.json says tie_word_embeddings: false and its files hold their own
    lm_head.weight, while transformers' T5 ties the head to `shared` whatever the config. Every
    offload mode must load the stored head (offload: disk used to tie it back to `shared`)."""
    import json

    from test_seq2seq import build_tiny_t5

    tok = build_tokenizer()
    build_tiny_t5(len(tok)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=False)))
    weights = load_file(tmp_path / "model.safetensors")
    torch.manual_seed(1)
    weights["lm_head.weight"] = torch.randn_like(weights["shared.weight"])
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    write_checksums(tmp_path)
    ids = torch.randint(3, len(tok), (1, 8))
    logits = {}
    for offload in ("none", "disk"):
        model, _tok = load_model(tmp_path, torch.device("cpu"), torch.float32, offload=offload, family="seq2seq_lm")
        assert torch.equal(model.lm_head.weight, weights["lm_head.weight"]), offload
        with torch.no_grad():
            logits[offload] = model(input_ids=ids, decoder_input_ids=ids).logits
    assert torch.equal(logits["none"], logits["disk"])


@pytest.mark.parametrize("offload", ["none", "disk"])
def test_a_stored_copy_of_the_tied_embeddings_is_pruned_and_written_once(tmp_path, offload):
    """The pruned checkpoint of a source that stores both tied names writes one (safetensors
    refuses two names for one tensor), the one save_pretrained keeps; reloaded, it is the
    pruned model."""
    import json
    from contextlib import ExitStack

    from conftest import calibration_batches, uniform_per_layer
    from ecoflap.models.base import model_layout
    from ecoflap.models.offload import resident
    from ecoflap.models.registry import adapter_for
    from ecoflap.pruning.checkpoint import PrunedCheckpoint
    from ecoflap.pruning.engine import prune_sequential
    from ecoflap.pruning.methods import make_pruner

    folder = _tied_llama_with_stored_head(tmp_path / "model", lambda e: e.clone())
    model, tok = load_model(folder, torch.device("cpu"), torch.float32, offload=offload)
    adapter = adapter_for(model)
    out = tmp_path / "pruned"
    out.mkdir()
    written = PrunedCheckpoint(model, adapter, folder, out)
    prune_sequential(model, adapter, make_pruner("wanda"), uniform_per_layer(model_layout(model, adapter), 0.5),
                     calibration_batches(tok), torch.device("cpu"), on_block_pruned=written.write_block)
    written.finish(tok)
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.embed_tokens.weight" in weight_map and "lm_head.weight" not in weight_map
    reloaded, _tok = load_model(out, torch.device("cpu"), torch.float32)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight  # tied again by from_pretrained
    with ExitStack() as held:  # offload disk: every block read (from the shards pruning wrote) while compared
        for block in adapter.blocks(model):
            held.enter_context(resident(block))
        pruned = model.state_dict()
        assert pruned.keys() == reloaded.state_dict().keys()
        for name, value in reloaded.state_dict().items():
            assert torch.equal(value, pruned[name]), name
