"""Task metrics against hand-computed values (no network; the java-only checks skip without java)."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from ecoflap.evaluation import metrics
from ecoflap.evaluation.metrics import (caption_metrics, gqa_accuracy, lemmatize_answers, normalize_vqa_answer,
                                        process_punctuation, retrieval_recall, simple_tokenize, topk_accuracy,
                                        vqa_accuracy, vqa_scores)

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
    ("'ow'sat", "'ow's'at"), ("ow's'at", "'ow's'at"), ("somebody'd", "somebodyd"), ("Im", "im"),
    ("  Yes \n", "yes"), ("red\tand   blue", "red and blue"), ("", ""),
])
def test_normalize_vqa_answer(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_process_punctuation_keeps_vqaeval_quirks():
    assert process_punctuation("yes!") == "yes "          # replaced by a space, not stripped
    assert process_punctuation("yes !") == "yes "         # touching a space: deleted
    assert process_punctuation("." * 40) == "." * 8       # re.UNICODE (32) passed as the count
    assert process_punctuation("a.b.c") == "abc"


# (prediction, human answers, accuracy under vqaeval2016 (LAVIS), under vqaeval2021), each derived by
# hand from the two versions of vqaEval.py: 2016 normalises the prediction fully and the answers'
# punctuation only when they disagree; 2021 normalises both sides fully when they disagree, neither
# when they agree. k matching answers of 10 score 0, .3, .6, .9 for k = 0..3 and 1 from 4 on.
OTHERS = ["1", "3", "4", "5", "6", "7", "8", "9", "10", "11"]
VQA_CASES = [
    ("Yes", ["yes"] * 10, 1.0, 0.0),                     # unanimous: 2021 compares raw strings
    ("yes.", ["yes"] * 10, 1.0, 0.0),                    # period stripped from the prediction only
    ("two", ["2"] * 10, 1.0, 0.0),                       # number word: prediction side only
    ("two", ["two"] * 10, 0.0, 1.0),                     # 2016: "2" against the raw unanimous "two"
    ("yes", ["Yes"] * 10, 0.0, 0.0),                     # a unanimous answer is never lower-cased
    ("the dog", ["dog"] * 2 + ["a dog"] * 3 + ["puppy"] * 5, 0.6, 1.0),   # articles: 2021 only
    ("two", ["two"] * 3 + ["2"] * 2 + ["3"] * 5, 0.6, 1.0),               # number words: 2021 only
    ("dont", ["don't"] * 3 + ["no"] * 7, 0.9, 0.9),      # contraction restored in the prediction
    ("don't", ["dont"] * 3 + ["no"] * 7, 0.0, 0.9),      # ...and in the answers only in 2021
    ("yes!", ["yes!"] * 2 + ["yes"] + ["no"] * 7, 0.3, 0.9),  # 2016: "yes!" -> "yes " never matches
    ("none", ["none"] * 3 + ["0"] + ["nothing"] * 6, 0.3, 1.0),
    ("t-shirt", ["t-shirt"] * 2 + ["shirt"] * 8, 0.6, 0.6),
    ("Red", ["red"] + ["blue"] * 9, 0.3, 0.3),
    ("red", ["red"], 0.0, 0.0),                          # one answer: the leave-one-out subset is empty
    ("3.", ["3"] * 5 + ["4"] * 5, 1.0, 1.0),
    ("2", ["2"] * 3 + OTHERS[:7], 0.9, 0.9),
    ("2", ["2"] * 2 + OTHERS[:8], 0.6, 0.6),
    ("2", ["2"] + OTHERS[:9], 0.3, 0.3),
    ("2", OTHERS, 0.0, 0.0),
    ("cat", ["cat", "cat", "cat", "dog", "dog"], (3 * 2 / 3 + 2) / 5, (3 * 2 / 3 + 2) / 5),
    ("cat", ["cat", "cat"], 1 / 3, 1 / 3),
]


@pytest.mark.parametrize("pred, gts, acc2016, acc2021", VQA_CASES)
def test_vqa_accuracy_under_each_protocol(pred, gts, acc2016, acc2021):
    assert vqa_accuracy(pred, gts, "vqaeval2016") == pytest.approx(acc2016)
    assert vqa_accuracy(pred, gts, "vqaeval2021") == pytest.approx(acc2021)


def test_vqa_accuracy_rejects_bad_input():
    with pytest.raises(ValueError):
        vqa_accuracy("cat", [])
    with pytest.raises(ValueError, match="protocol"):
        vqa_accuracy("cat", ["cat"], "exact")


@pytest.mark.parametrize("pred, answer, published, dec2023", [
    ("A dog.", "dog", 1.0, 1.0),      # prediction normalised
    ("two", "2", 1.0, 1.0),
    ("t-shirt", "t-shirt", 0.0, 1.0),  # the raw answer keeps its hyphen; the prediction does not
    ("left side", "left", 0.0, 0.0),
    ("Yes", "yes", 1.0, 1.0),
])
def test_gqa_accuracy(pred, answer, published, dec2023):
    assert gqa_accuracy(pred, answer, "lavis_gqa") == published
    assert gqa_accuracy(pred, answer, "lavis_gqa_2023_12") == dec2023


def test_vqa_scores():
    answers = {1: ["2"] * 3 + ["3"] * 7, 2: ["yes"] * 10, 3: ["no"] * 10}
    out = vqa_scores({1: "two", 2: "Yes", 3: "yes", 99: "ignored"}, answers)
    # 2016: "two" -> "2" (k=3: 0.9); "Yes" -> "yes" matches; "yes" vs "no" 0; rounded to 2 decimals
    assert out == {"accuracy": round(100 * (0.9 + 1 + 0) / 3, 2), "n": 3, "protocol": "vqaeval2016"}
    # 2021: the two unanimous questions compare raw strings: "Yes" != "yes"
    assert vqa_scores({1: "two", 2: "Yes", 3: "yes"}, answers, "vqaeval2021")["accuracy"] == round(100 * 0.9 / 3, 2)
    gqa = vqa_scores({"a": "the table", "b": "left"}, {"a": ["table"], "b": ["right"]}, protocol="lavis_gqa")
    assert gqa == {"accuracy": pytest.approx(50.0), "n": 2, "protocol": "lavis_gqa"}
    with pytest.raises(ValueError, match="3"):
        vqa_scores({1: "2", 2: "yes"}, answers)
    with pytest.raises(ValueError):
        vqa_scores({1: "2"}, {1: ["2"]}, protocol="bleu")


def test_lemmatize_answers_joins_tokens_as_blip2():
    class Token:
        def __init__(self, text, pos, lemma):
            self.text, self.pos_, self.lemma_ = text, pos, lemma

    def nlp(text):  # a stand-in tagger: what BLIP-2's _lemmatize does with spaCy's tokens
        table = {"dogs": ("NOUN", "dog"), "running": ("VERB", "run"), "red": ("ADJ", "red"),
                 "do": ("AUX", "do"), "n't": ("PART", "not")}
        words = text.replace("n't", " n't").split()
        return [Token(w, *table.get(w, ("X", w))) for w in words]

    assert lemmatize_answers({1: "dogs running", 2: "red dogs", 3: "don't"}, nlp) == \
        {1: "dog run", 2: "red dog", 3: "do n't"}


def test_lemmatize_without_spacy_names_the_fix(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_spacy(name, *args, **kwargs):
        if name == "spacy":
            raise ImportError("No module named 'spacy'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_spacy)
    with pytest.raises(RuntimeError, match="en_core_web_sm"):
        lemmatize_answers({1: "dogs"})


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


def test_nan_similarities_stop_retrieval_instead_of_scoring():
    """A diverged model's NaN embeddings: topk would rank the NaNs in index order and report a
    plausible recall (37.5 here), so the metric stops and names the likely cause."""
    sim = torch.full((4, 8), float("nan"))
    with pytest.raises(FloatingPointError, match="retrieval similarity.*pruned model diverged"):
        retrieval_recall(sim, [i // 2 for i in range(8)], [[2 * i, 2 * i + 1] for i in range(4)], ks=(1, 2))


def test_nan_logits_stop_zero_shot_accuracy_instead_of_scoring():
    logits = torch.tensor([[0.1, 0.7, 0.2], [float("nan"), 0.3, 0.2]])
    with pytest.raises(FloatingPointError, match="classification logits.*pruned model diverged"):
        topk_accuracy(logits, torch.tensor([1, 0]), ks=(1,))


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


def test_vision_language_evaluation_imports_without_pycocoevalcap():
    """A GPU machine without pycocoevalcap runs VQA, retrieval and classification (the device
    check's section C); only scoring a caption needs the package, and then it says so."""
    import subprocess
    import sys

    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "pycocoevalcap":
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import ecoflap.evaluation.vision_language
from ecoflap.evaluation.metrics import caption_metrics, retrieval_recall
try:
    caption_metrics({1: "a dog"}, {1: ["a dog runs"]}, spice=False, meteor=False)
except RuntimeError as exc:
    print(exc)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "caption metrics need pycocoevalcap: pip install pycocoevalcap==1.2" in done.stdout
