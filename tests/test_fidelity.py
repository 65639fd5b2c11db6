"""Protocols as the reference code runs them, each checked against rules derived by hand from
that code: Wanda's eval_ppl and WikiText-2 joining, ECoFLaP's BLIP-2 calibration (prefix split,
pair order, caption cleaning, truncation, crop/flip), its per-tensor zeroth-order scores summed
per block, and the whole-matrix Wanda threshold it uses on the ViT."""
from __future__ import annotations

import math
import random
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import vl_models
from conftest import REPO
from ecoflap.data.captions import blip_pre_caption

FIX = REPO / "tests" / "fixtures" / "vl"


def test_perplexity_equals_wandas_eval_ppl(tiny):
    """Wanda: per window, the mean loss over seq_len - 1 shifted tokens times seq_len; perplexity =
    exp(sum / (windows * seq_len)), windows = numel // seq_len, batch size 1."""
    from ecoflap.data.corpora import embedded_text
    from ecoflap.evaluation.perplexity import perplexity

    model, tok, _ = tiny
    text = embedded_text("brown-heldout")[:6000]
    seq_len = 64
    ids = tok(text, return_tensors="pt").input_ids
    n = ids.numel() // seq_len
    nlls = []
    with torch.no_grad():
        for i in range(n):
            window = ids[:, i * seq_len:(i + 1) * seq_len]
            logits = model(window).logits[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
            nlls.append(loss.item() * seq_len)
    wanda = math.exp(sum(nlls) / (n * seq_len))
    for batch_size in (1, 3):
        ours = perplexity(model, tok, text, seq_len, torch.device("cpu"), None, batch_size)
        assert ours["windows"] == n
        assert ours["perplexity"] == pytest.approx(wanda, rel=1e-5)


def test_wikitext2_is_joined_with_blank_lines_as_wanda(monkeypatch):
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda *a, **k: {"text": [" = Title = \n", "", " Some text .\n"]}
    monkeypatch.setitem(sys.modules, "datasets", fake)
    from ecoflap.data.corpora import wikitext2_test

    assert wikitext2_test() == " = Title = \n\n\n\n\n Some text .\n"


@pytest.mark.parametrize("raw, clean", [
    ("A Dog, running (fast)!", "a dog, running fast"),   # commas stay; . ! " ( ) * # : ; ~ go
    ("  two   spaces  ", "two spaces"),
    ("end.", "end"),
    ("#tag: one~two", "tag one two"),
])
def test_blip_pre_caption(raw, clean):
    assert blip_pre_caption(raw) == clean


def test_blip_pre_caption_cuts_to_50_words():
    assert blip_pre_caption(" ".join(f"w{i}" for i in range(60))) == " ".join(f"w{i}" for i in range(50))


@pytest.fixture(scope="module")
def blip2_t5(tmp_path_factory):
    return vl_models.build("blip2_t5", tmp_path_factory.mktemp("blip2_t5"))


def test_ecoflap_calibration_protocol(blip2_t5):
    """First pairs in file order, BLIP caption cleaning, a seeded split at character
    randint(1, len // 2): encoder = image tokens + prefix ids, labels = the rest's ids, both
    tokenised as LAVIS does (special tokens, truncation to max_txt_len)."""
    import json

    from ecoflap.data import pairs as pr
    from ecoflap.data.files import open_image
    from ecoflap.models.image_calibration import _processor_size, _train_crop_flip, build_image_caption_calibration
    from ecoflap.models.processors import load_processors

    paths = {"pairs": str(FIX / "cc3m/pairs.tsv"), "image_root": str(FIX / "cc3m")}
    data = build_image_caption_calibration(blip2_t5, "cc3m", 3, seed=7, paths=paths, protocol="ecoflap",
                                           max_txt_len=4)
    every = pr._delimited_pairs(FIX / "cc3m/pairs.tsv", FIX / "cc3m", "CC3M", "k")
    first = every[:3]  # file order, not a random sample
    procs = load_processors(blip2_t5)
    tok = procs.tokenizer
    # replay the builder's draws: crop/flip per image, then one split per caption
    rng = random.Random(7)
    for pair in first:
        _train_crop_flip(open_image(pair.image_path), rng, _processor_size(procs.image_processor))
    cfg = json.loads((blip2_t5 / "config.json").read_text())
    image = [cfg["image_token_index"]] * cfg["num_query_tokens"]
    for row, pair in enumerate(first):
        text = blip_pre_caption(pair.caption)
        split = rng.randint(1, len(text) // 2)
        prefix = tok(text[:split], truncation=True, max_length=4).input_ids
        target = tok(text[split:], truncation=True, max_length=4).input_ids
        width = data["attention_mask"][row].sum().item()
        assert data["input_ids"][row][:width].tolist() == image + prefix
        assert [t for t in data["labels"][row].tolist() if t != -100] == target
        assert len(prefix) <= 4 and len(target) <= 4  # max_txt_len applies to each half
    assert any(len(tok(blip_pre_caption(p.caption)).input_ids) > 4 for p in first)  # truncation did bite


def test_ecoflap_split_points_are_seeded_and_in_the_first_half(blip2_t5, monkeypatch):
    from ecoflap.models import image_calibration as cal

    seen = []
    real = cal.random.Random.randint

    def spy(self, a, b):
        value = real(self, a, b)
        seen.append((a, b, value))
        return value

    monkeypatch.setattr(cal.random.Random, "randint", spy)
    paths = {"pairs": str(FIX / "cc3m/pairs.tsv"), "image_root": str(FIX / "cc3m")}
    a = cal.build_image_caption_calibration(blip2_t5, "cc3m", 3, 1, paths, protocol="ecoflap")
    splits = [(lo, hi, v) for lo, hi, v in seen if lo == 1]
    assert len(splits) >= 3 and all(1 <= v <= hi for lo, hi, v in splits)
    b = cal.build_image_caption_calibration(blip2_t5, "cc3m", 3, 1, paths, protocol="ecoflap")
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same batch (pixels included)


def test_train_crop_flip_gives_square_crops_of_the_processor_size():
    from PIL import Image

    from ecoflap.models.image_calibration import _train_crop_flip

    image = Image.new("RGB", (64, 48))
    for seed in range(20):
        out = _train_crop_flip(image, random.Random(seed), 32)
        assert out.size == (32, 32)


def test_zeroth_order_per_tensor_sums_into_blocks(tiny, calib_batches):
    from ecoflap.scoring.zeroth_order import zeroth_order_scores

    model, _tok, adapter = tiny
    dev = torch.device("cpu")
    per_layer = zeroth_order_scores(model, adapter, calib_batches, dev, granularity="layer", seed=3)
    per_block = zeroth_order_scores(model, adapter, calib_batches, dev, granularity="block", seed=3,
                                    perturb="tensor")
    assert set(per_block) == {name for name, _ in adapter.named_blocks(model)}
    for block, value in per_block.items():
        assert value == pytest.approx(sum(v for k, v in per_layer.items() if k.startswith(block + ".")))


def test_matrix_threshold_prunes_as_ecoflaps_vit_wanda():
    from ecoflap.pruning.masks import matrix_threshold_mask, select_mask

    score = torch.arange(20, dtype=torch.float32).reshape(4, 5)[torch.randperm(4)]
    mask = matrix_threshold_mask(score, 0.5)
    # thres = sorted(flat)[int(20 * 0.5)] = 10; everything <= 10 is pruned: 11 weights
    assert mask.sum().item() == 11 and (score[mask] <= 10).all() and (score[~mask] > 10).all()
    assert select_mask(score, 0.5, None, "matrix").equal(mask)
    row = select_mask(score, 0.5, None, "row")
    assert (row.sum(1) == 2).all()  # round(5 * 0.5) = 2 per row: the default is unchanged
