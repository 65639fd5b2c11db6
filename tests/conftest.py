"""Tiny models built in code (no network): a 3-block LLaMA with a byte-level BPE tokenizer
trained on the embedded Austen text."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

REPO = Path(__file__).resolve().parent.parent


def run_snakemake(workdir, configfile, *args, targets=(), timeout=600):
    """The workflow as a user runs it, on a config in a work folder (targets before
    --configfile, which would read them as more config files)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "snakemake", *targets, "-s", str(REPO / "Snakefile"),
                           "--directory", str(workdir), "--configfile", str(configfile), *args],
                          capture_output=True, text=True, timeout=timeout)


def build_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from ecoflap.data.corpora import embedded_text

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([embedded_text("austen-emma")[:60_000]], vocab_size=384, min_frequency=2,
                            special_tokens=["<pad>", "<s>", "</s>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def build_tiny_llama(vocab_size: int, seed: int = 0, layers: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    # default init makes every block look alike; spread the weights so blocks differ
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for p in layer.parameters():
                if p.dim() == 2:
                    p.mul_(1 + i)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A from_pretrained folder with a tiny random LLaMA and its tokenizer."""
    out = tmp_path_factory.mktemp("tiny_llama")
    tok = build_tokenizer()
    model = build_tiny_llama(len(tok))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture()
def tiny(tiny_dir):
    from ecoflap.models.registry import adapter_for
    from ecoflap.models.loading import load_model

    model, tok = load_model(tiny_dir, torch.device("cpu"), torch.float32)
    return model, tok, adapter_for(model)


@pytest.fixture()
def calib_batches(tiny):
    from ecoflap.data.calibration import batches, build_calibration

    _model, tok, _adapter = tiny
    ids = build_calibration(tok, "austen-emma", n_samples=8, seq_len=32, seed=0)
    return batches(ids, 4)


def calibration_batches(tok, n_samples: int = 8, seq_len: int = 32, batch_size: int = 4):
    """The tiny LLaMA's calibration batches, as the offload tests use them."""
    from ecoflap.data.calibration import batches, build_calibration

    return batches(build_calibration(tok, "austen-emma", n_samples=n_samples, seq_len=seq_len, seed=0), batch_size)


def uniform_per_layer(layout: dict, target: float) -> dict:
    """Every layer of `layout` at the same sparsity: the uniform allocation, per layer."""
    from ecoflap.allocation import ratios

    return ratios.expand_to_layers(ratios.uniform(ratios.unit_sizes(layout, "block"), target), layout)


def every_scorer(model, adapter, batches, device=torch.device("cpu")) -> dict:
    """Each scorer that runs block by block, on one model: what the offload modes must
    reproduce bit for bit (first_order runs one backward over the whole model and refuses
    offload; atp_search prunes and restores the model, and refuses disk)."""
    from ecoflap.scoring.checkpointed import checkpointed_gradient_scores
    from ecoflap.scoring.esd_alpha import esd_alpha_scores
    from ecoflap.scoring.outliers import outlier_ratios
    from ecoflap.scoring.zeroth_order import zeroth_order_scores

    return {
        "zo": zeroth_order_scores(model, adapter, batches, device, granularity="layer", reuse_block_inputs=True),
        "zo_full": zeroth_order_scores(model, adapter, batches, device, granularity="block", reuse_block_inputs=False),
        "fast": checkpointed_gradient_scores(model, adapter, batches, device, "block", "l2"),
        "abs_wg": checkpointed_gradient_scores(model, adapter, batches, device, "layer", "abs_wg"),
        "owl": outlier_ratios(model, adapter, batches, device),
        "alpha": esd_alpha_scores(model, adapter, batches, device),
    }
