"""Task metrics against hand-computed values (no network; the java-only checks skip without java)."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from ecoflap.evaluation import metrics
from ecoflap.evaluation.metrics import (caption_metrics, exact_match_accuracy, normalize_vqa_answer,
                                        retrieval_recall, simple_tokenize, topk_accuracy, vqa_accuracy,
                                        vqa_scores)

HAS_JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not HAS_JAVA, reason="PTB tokenizer / METEOR need java on PATH")


# --------------------------------------------------------------------------------------------- VQA

@pytest.mark.parametrize("raw, expected", [
    ("two", "2"), ("Two dogs", "2 dogs"), ("none", "0"), ("ten", "10"),
    ("a dog", "dog"), ("The cat", "cat"), ("an apple", "apple"),
    ("yes!", "yes"), ("yes.", "yes"), ("what?", "what"), ("hi; there", "hi there"),
    ("black/white", "black white"), ("x-ray", "x ray"),
    ("3.5", "3.5"), ("3.", "3"),
    ("1,000", "1000"),  # a digit-comma-digit makes every listed mark vanish, as in vqaEval.py
    ("dont", "don't"), ("isnt", "isn't"), ("oclock", "o'clock"), ("don't", "don't"),
    ("  Yes \n", "yes"), ("red\tand   blue", "red and blue"), ("", ""),
])
def test_normalize_vqa_answer(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_vqa_accuracy_leave_one_out():
    others = ["1", "3", "4", "5", "6", "7", "8", "9", "10", "11"]
    assert vqa_accuracy("2", ["2"] * 3 + others[:7]) == pytest.approx(0.9)       # (3*2/3 + 7*1)/10
    assert vqa_accuracy("2", ["2"] * 2 + others[:8]) == pytest.approx(0.6)       # (2*1/3 + 8*2/3)/10
    assert vqa_accuracy("2", ["2"] + others[:9]) == pytest.approx(0.3)           # (1*0 + 9*1/3)/10
    assert vqa_accuracy("2", others) == 0.0
    assert vqa_accuracy("2", ["2"] * 4 + others[:6]) == pytest.approx(1.0)
    # both sides are normalised before matching
    assert vqa_accuracy("Two!", ["2", "two", "the 2"] + others[:7]) == pytest.approx(0.9)


def test_vqa_accuracy_other_answer_counts():
    assert vqa_accuracy("cat", ["cat", "cat", "cat", "dog", "dog"]) == pytest.approx((3 * 2 / 3 + 2) / 5)
    assert vqa_accuracy("Cat.", ["cat"]) == 1.0   # one answer: leave-one-out is empty -> exact match
    assert vqa_accuracy("dog", ["cat"]) == 0.0
    with pytest.raises(ValueError):
        vqa_accuracy("cat", [])


def test_exact_match_accuracy():
    assert exact_match_accuracy("Yes.", "yes") == 1.0
    assert exact_match_accuracy("a red car", "red car") == 1.0
    assert exact_match_accuracy("red", "blue") == 0.0


def test_vqa_scores():
    answers = {1: ["2"] * 3 + ["3"] * 7, 2: ["yes"] * 10, 3: ["no"] * 10}
    out = vqa_scores({1: "two", 2: "Yes", 3: "yes", 99: "ignored"}, answers, kind="vqa")
    assert out == {"accuracy": pytest.approx(100 * (0.9 + 1 + 0) / 3), "n": 3}
    gqa = vqa_scores({"a": "the table", "b": "left"}, {"a": ["table"], "b": ["right"]}, kind="exact")
    assert gqa == {"accuracy": pytest.approx(50.0), "n": 2}
    with pytest.raises(ValueError, match="3"):
        vqa_scores({1: "2", 2: "yes"}, answers)
    with pytest.raises(ValueError):
        vqa_scores({1: "2"}, {1: ["2"]}, kind="bleu")


# ------------------------------------------------------------------------------------- retrieval

def test_retrieval_recall_hand_built():
    # 3 images, 5 texts; texts 0,1 -> image 0, text 2 -> image 1, texts 3,4 -> image 2
    texts_of_image = [[0, 1], [2], [3, 4]]
    img_of_text = [0, 0, 1, 2, 2]
    sim = torch.tensor([
        #  t0    t1    t2    t3    t4
        [0.9, 0.1, 0.0, 0.2, 0.3],     # image 0: best text t0 (own)            -> TR@1 hit
        [0.1, 0.2, 0.3, 0.8, 0.0],     # image 1: t3 then t2 (own)              -> TR@1 miss, TR@2 hit
        [0.5, 0.4, 0.25, 0.15, 0.1],   # image 2: own t3/t4 ranked 4th and 5th  -> hit only at TR@5
    ])
    # columns: t0 -> image 0 first (hit); t1 -> images 2, 1, 0 (own last); t2 -> image 1 first (hit);
    # t3 -> images 1, 0, 2 (own last); t4 -> images 0, 2 (own second)
    out = retrieval_recall(sim, img_of_text, texts_of_image, ks=(1, 2, 5))
    assert out["TR@1"] == pytest.approx(100 / 3)
    assert out["TR@2"] == pytest.approx(200 / 3)
    assert out["TR@5"] == pytest.approx(100.0)
    assert out["IR@1"] == pytest.approx(40.0)     # t0, t2
    assert out["IR@2"] == pytest.approx(60.0)     # + t4
    assert out["IR@5"] == pytest.approx(100.0)    # k clipped to 3 images
    assert out["mean"] == pytest.approx(sum(v for k, v in out.items() if k != "mean") / 6)
    default = retrieval_recall(sim, img_of_text, texts_of_image)
    assert set(default) == {"TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10", "mean"}
    with pytest.raises(ValueError):
        retrieval_recall(sim.T, img_of_text, texts_of_image)


def test_topk_accuracy():
    logits = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    labels = torch.tensor([1, 1, 0, 2])
    out = topk_accuracy(logits, labels, ks=(1, 2, 5))
    assert out["top1"] == pytest.approx(25.0)    # only sample 0
    assert out["top2"] == pytest.approx(50.0)    # + sample 1
    assert out["top5"] == pytest.approx(100.0)   # clipped to 3 classes
    assert set(topk_accuracy(logits, labels)) == {"top1", "top5"}


# ------------------------------------------------------------------------------------- captions

REFS = {
    1: ["a man riding a wave on top of a surfboard"],
    2: ["two giraffes standing next to each other in a field"],
    3: ["a plate of food with broccoli and rice on a wooden table"],
    4: ["a red double decker bus driving down a city street"],
}
COPIES = {k: v[0] for k, v in REFS.items()}
PARAPHRASES = {1: "a surfer rides the ocean wave", 2: "giraffes stand in the grass together",
               3: "rice and vegetables served on a dish", 4: "a bus on the road in town"}


@pytest.fixture()
def no_java(monkeypatch):
    monkeypatch.setattr(metrics, "_java", lambda: None)


def test_caption_copy_vs_paraphrase_simple_tokenizer(no_java):
    copy = caption_metrics(COPIES, REFS, spice=False)
    para = caption_metrics(PARAPHRASES, REFS, spice=False)
    assert copy["tokenizer"] == "simple (java not found)"
    assert copy["METEOR"] == {"skipped": metrics.METEOR_SKIP}
    assert "SPICE" not in copy
    assert copy["n"] == 4
    for n in range(1, 5):
        assert copy[f"BLEU-{n}"] == pytest.approx(100.0, abs=1e-4)
    assert copy["ROUGE_L"] == pytest.approx(100.0)
    # CIDEr-D of an exact copy of a single reference: cosine 1 at every n-gram order, x10, x100
    assert copy["CIDEr"] == pytest.approx(1000.0, rel=1e-6)
    for key in ("BLEU-1", "BLEU-4", "ROUGE_L", "CIDEr"):
        assert isinstance(para[key], float)
        assert 0.0 <= para[key] < copy[key], key


def test_caption_id_mismatch():
    with pytest.raises(ValueError, match="only in predictions"):
        caption_metrics({**COPIES, 5: "extra"}, REFS)
    with pytest.raises(ValueError, match="4"):
        caption_metrics({1: COPIES[1], 2: COPIES[2], 3: COPIES[3]}, REFS)


def test_spice_skipped_without_corenlp_jars(no_java):
    lib = metrics._spice_lib_dir()
    if all(os.path.exists(os.path.join(lib, j)) for j in metrics.SPICE_JARS):
        pytest.skip("Stanford CoreNLP jars are installed here; SPICE would run")
    out = caption_metrics(COPIES, REFS, spice=True)
    assert isinstance(out["SPICE"], dict)
    assert "skipped" in out["SPICE"] and lib in out["SPICE"]["skipped"]


def test_simple_tokenize():
    assert simple_tokenize("A dog's bone, isn't it?") == "a dog 's bone is n't it"
    assert simple_tokenize("3.5 kg of 1,000 black-and-white (old) photos...") == \
        "3.5 kg of 1,000 black-and-white -lrb- old -rrb- photos"
    assert simple_tokenize("Mr. Smith in the U.S. today.") == "mr. smith in the u.s. today"


@needs_java
def test_caption_metrics_with_java():
    out = caption_metrics(COPIES, REFS, spice=False)
    assert out["tokenizer"] == "ptb"
    assert isinstance(out["METEOR"], float) and out["METEOR"] == pytest.approx(100.0, abs=1e-6)
    assert out["BLEU-4"] == pytest.approx(100.0, abs=1e-4)
    assert out["CIDEr"] == pytest.approx(1000.0, rel=1e-6)


@needs_java
def test_simple_tokenizer_matches_ptb():
    sentences = ["A dog's running, on the (grassy) field!", "Two men don't play [chess] 3.5 times; \"ok\"",
                 "", "won't they've I'm you'll", "A  woman's   hat\nand a 'quoted' word -- well...", "Mr. Smith in the U.S. today.",
                 "The letter B. on a sign, i.e. a logo."]
    ptb = metrics._tokenize({i: [s] for i, s in enumerate(sentences)}, use_ptb=True)
    assert [ptb[i][0] for i in range(len(sentences))] == [simple_tokenize(s) for s in sentences]
