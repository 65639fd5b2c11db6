"""Task metrics for the multimodal evaluations: VQA accuracy (VQAv2 protocol), GQA exact match,
COCO caption metrics (pycocoevalcap), image-text retrieval recall@K and top-K classification accuracy.

Every number is a percentage (0-100), as the papers report them. A metric that cannot run here is
reported as ``{"skipped": reason}``, never as a silent zero.
"""
from __future__ import annotations

import os
import re
import shutil
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Hashable, Literal

import torch

# ----------------------------------------------------------------------------------------------------
# VQA answer normalisation (the rules of the official VQAv2 evaluation script, vqaEval.py)
# ----------------------------------------------------------------------------------------------------

# The official contraction table, entries as published (including its oddities: capitalised keys
# that can never match lower-cased text, and "somebody'd" mapped to "somebodyd").
_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow'sat", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
# "none" -> "0" is part of the official map.
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
          ",", "?", "!")
# The official regex (its "(?!<=" is a look-ahead, not a look-behind, so in effect: a period not
# followed by a digit is removed; "3.5" survives, "3." does not).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The official script passes re.UNICODE (== 32) positionally as `count`; we keep that limit.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def _process_punctuation(text: str) -> str:
    out = text
    has_number_comma = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        # removed outright when next to a space (or when the text has a "1,000"-style number),
        # otherwise replaced by a space so "black/white" becomes two words
        if p + " " in text or " " + p in text or has_number_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def _process_digit_article(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_vqa_answer(answer: str) -> str:
    """Official VQAv2 answer normalisation, so that "Two dogs!" and "2 dogs" compare equal.

    Steps: newline/tab to space, strip, lower-case; punctuation rules of vqaEval.py (note: a comma
    between digits makes every listed punctuation mark be deleted, so "1,000" becomes "1000");
    number words zero..ten (and "none") to digits; articles dropped; apostrophe-less contractions
    restored ("dont" -> "don't"); whitespace collapsed.
    """
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    return _process_digit_article(_process_punctuation(text))


def vqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """VQAv2 soft accuracy in [0, 1]: the mean over the leave-one-annotator-out subsets of
    min(1, #matches / 3), so an answer given by 3+ of 10 annotators scores 1.

    Differences from vqaEval.py, on purpose: ground-truth answers are fully normalised here (the
    official script only strips their punctuation, and only when annotators disagree; VQAv2's stored
    answers are already normalised, so this does not change VQAv2 numbers). With a single
    ground-truth answer the leave-one-out subset is empty, so we fall back to exact match.
    """
    if isinstance(gt_answers, str) or len(gt_answers) == 0:
        raise ValueError("gt_answers must be a non-empty list of strings")
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in gt_answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    n_match = sum(g == pred for g in gts)
    # leaving out a matching annotator leaves n_match - 1 matches, any other leaves n_match
    total = sum(min(1.0, (n_match - (g == pred)) / 3.0) for g in gts)
    return total / len(gts)


def exact_match_accuracy(prediction: str, answer: str) -> float:
    """GQA accuracy for one question: 1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize_vqa_answer(prediction) == normalize_vqa_answer(answer))


def vqa_scores(preds: Mapping[Hashable, str], answers: Mapping[Hashable, Sequence[str]],
               kind: Literal["vqa", "exact"] = "vqa") -> dict[str, float | int]:
    """Dataset-level accuracy (percent) over the questions in `answers`.

    kind="vqa": VQAv2/OK-VQA soft accuracy; kind="exact": GQA exact match (correct if the prediction
    equals any listed answer; GQA lists one). Predictions for questions not in `answers` are ignored;
    a question without a prediction is an error, because scoring it as wrong would hide a bug.
    """
    if kind not in ("vqa", "exact"):
        raise ValueError(f"kind must be 'vqa' or 'exact', got {kind!r}")
    if not answers:
        raise ValueError("no questions to score (answers is empty)")
    missing = [q for q in answers if q not in preds]
    if missing:
        raise ValueError(f"{len(missing)} question id(s) have no prediction, e.g. {missing[:5]}")
    scores = []
    for qid, gts in answers.items():
        gts = [gts] if isinstance(gts, str) else list(gts)
        if kind == "vqa":
            scores.append(vqa_accuracy(preds[qid], gts))
        else:
            scores.append(max(exact_match_accuracy(preds[qid], g) for g in gts))
    return {"accuracy": 100.0 * sum(scores) / len(scores), "n": len(scores)}


# ----------------------------------------------------------------------------------------------------
# Captioning (COCO caption evaluation via pycocoevalcap 1.2)
# ----------------------------------------------------------------------------------------------------

METEOR_SKIP = "needs java on PATH (apt install default-jre-headless)"
METEOR_TIMEOUT_S = 900.0
SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
# Tokens the coco-caption PTB wrapper deletes after tokenising (upper-case bracket names included:
# PTBTokenizer runs with -lowerCase, so brackets come out as "-lrb-" and survive, as they do there).
_PTB_DROPPED = frozenset({"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",",
                          ":", "-", "--", "...", ";"})
_BRACKETS = {"(": " -lrb- ", ")": " -rrb- ", "[": " -lsb- ", "]": " -rsb- ", "{": " -lcb- ",
             "}": " -rcb- "}
# PTB keeps the period of acronyms ("u.s."), single-letter initials ("b.") and common abbreviations
_ABBREVIATIONS = ("mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "inc", "co", "ltd", "mt", "ave",
                  "ft", "jan", "feb", "aug", "sept", "oct", "nov", "dec")
_SIMPLE_TOKEN = re.compile(
    r"-[lr][rsc]b-|\d+(?:[.,:]\d+)+|n't|'(?:s|re|ve|ll|d|m)\b"
    r"|(?:[a-z]\.){2,}|\b[a-z]\.(?!\w)|\b(?:" + "|".join(_ABBREVIATIONS) + r")\.|\bno\.(?=\s*\d)"
    r"|\w+(?:-\w+)*|[^\w\s]")


def _java() -> str | None:
    return shutil.which("java")


def simple_tokenize(caption: str) -> str:
    """Pure-Python stand-in for the coco-caption PTB tokenisation, used when Java is missing.

    Lower-cases, splits clitics the way PTB does ("don't" -> "do n't", "dog's" -> "dog 's"), keeps
    numbers like "3.5"/"1,000", hyphenated words, acronyms ("u.s."), initials and common
    abbreviations ("mr.") whole, maps brackets to "-lrb-" etc. and drops the punctuation tokens the
    coco-caption wrapper drops (. , ? ! : ; - -- ... quotes). Close to, but not guaranteed identical
    with, the PTB path (its abbreviation rules are longer); results record which one was used.
    """
    text = caption.replace("\n", " ").lower()
    for b, name in _BRACKETS.items():
        text = text.replace(b, name)
    text = re.sub(r"(\w)n't\b", r"\1 n't", text)
    text = re.sub(r"(\w)'(s|re|ve|ll|d|m)\b", r"\1 '\2", text)
    tokens = _SIMPLE_TOKEN.findall(text)
    return " ".join(t for t in tokens if t not in _PTB_DROPPED and t != '"')


def _tokenize(captions: Mapping[Hashable, list[str]], use_ptb: bool) -> dict[Hashable, list[str]]:
    if use_ptb:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        out = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
        if any(len(out.get(k, ())) != len(v) for k, v in captions.items()):
            raise RuntimeError("PTBTokenizer returned a different number of captions than it was given")
        return out
    return {k: [simple_tokenize(c) for c in v] for k, v in captions.items()}


def _spice_lib_dir() -> str:
    # pycocoevalcap is a namespace package (no __init__.py, so no __file__); spice/ is a package
    from pycocoevalcap.spice import get_stanford_models

    return os.path.join(os.path.dirname(os.path.abspath(get_stanford_models.__file__)), "lib")


def _run_meteor(gts: dict, res: dict) -> float:
    """METEOR 1.5 through pycocoevalcap's long-lived java process, with a watchdog so a stuck
    subprocess fails loudly instead of hanging, and cleanup that avoids its __del__ deadlock."""
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    watchdog = threading.Timer(METEOR_TIMEOUT_S, meteor.meteor_p.kill)
    watchdog.start()
    try:
        score, _ = meteor.compute_score(gts, res)
        return float(score)
    finally:
        watchdog.cancel()
        if meteor.lock.locked():  # compute_score raised while holding it; __del__ would deadlock
            meteor.lock.release()
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()


def caption_metrics(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
                    spice: bool = True) -> dict[str, Any]:
    """COCO caption metrics (x100): BLEU-1..4, METEOR, ROUGE_L, CIDEr (CIDEr-D, corpus IDF), SPICE.

    Tokenisation is pycocoevalcap's Stanford PTBTokenizer when `java` is on PATH, else
    `simple_tokenize` (recorded under "tokenizer"). METEOR needs Java; SPICE needs Java plus the
    Stanford CoreNLP 3.6.0 jars, which pycocoevalcap would otherwise try to download; a metric that
    cannot run is reported as {"skipped": reason}.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    pred_ids, ref_ids = set(predictions), set(references)
    if pred_ids != ref_ids:
        only_pred = sorted(map(str, pred_ids - ref_ids))[:5]
        only_ref = sorted(map(str, ref_ids - pred_ids))[:5]
        raise ValueError(f"prediction and reference image ids differ: {len(pred_ids - ref_ids)} only in "
                         f"predictions (e.g. {only_pred}), {len(ref_ids - pred_ids)} only in references "
                         f"(e.g. {only_ref})")
    if not predictions:
        raise ValueError("no captions to score")
    for k, refs in references.items():
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"image {k!r}: references must be a non-empty list of strings")

    java = _java() is not None
    gts = _tokenize({k: list(v) for k, v in references.items()}, java)
    res = _tokenize({k: [predictions[k]] for k in references}, java)
    result: dict[str, Any] = {"n": len(res), "tokenizer": "ptb" if java else "simple (java not found)"}

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, b in enumerate(bleu, start=1):
        result[f"BLEU-{n}"] = 100.0 * float(b)
    result["METEOR"] = 100.0 * _run_meteor(gts, res) if java else {"skipped": METEOR_SKIP}
    result["ROUGE_L"] = 100.0 * float(Rouge().compute_score(gts, res)[0])
    result["CIDEr"] = 100.0 * float(Cider().compute_score(gts, res)[0])

    if spice:
        lib = _spice_lib_dir()
        if not all(os.path.exists(os.path.join(lib, j)) for j in SPICE_JARS):
            result["SPICE"] = {"skipped": f"needs Stanford CoreNLP 3.6.0 jars in {lib}; run pycocoevalcap's "
                                          "get_stanford_models once online"}
        elif not java:
            result["SPICE"] = {"skipped": "needs java on PATH (apt install default-jre-headless)"}
        else:
            from pycocoevalcap.spice.spice import Spice

            result["SPICE"] = 100.0 * float(Spice().compute_score(gts, res)[0])
    return result


# ----------------------------------------------------------------------------------------------------
# Retrieval and classification
# ----------------------------------------------------------------------------------------------------

def retrieval_recall(sim: torch.Tensor, img_of_text: Sequence[int], texts_of_image: Sequence[Sequence[int]],
                     ks: Iterable[int] = (1, 5, 10)) -> dict[str, float]:
    """Image-text retrieval recall@K (percent) from a [n_images, n_texts] similarity matrix.

    TR@k: share of images with at least one of their own texts among their k most similar texts;
    IR@k: share of texts whose own image is among their k most similar images; "mean" averages all.
    k larger than the candidate count is clipped (everything is retrieved).
    """
    if sim.dim() != 2:
        raise ValueError(f"sim must be [n_images, n_texts], got shape {tuple(sim.shape)}")
    n_img, n_txt = sim.shape
    if len(texts_of_image) != n_img or len(img_of_text) != n_txt:
        raise ValueError(f"sim is {n_img}x{n_txt} but there are {len(texts_of_image)} images and "
                         f"{len(img_of_text)} texts in the ground truth")
    ks = list(ks)
    sim = sim.detach().float().cpu()
    own_text = torch.zeros(n_img, n_txt, dtype=torch.bool)
    for i, texts in enumerate(texts_of_image):
        own_text[i, list(texts)] = True
    own_img = torch.as_tensor(list(img_of_text), dtype=torch.long)

    out: dict[str, float] = {}
    for k in ks:
        top_txt = sim.topk(min(k, n_txt), dim=1).indices  # [n_img, k]
        out[f"TR@{k}"] = 100.0 * own_text.gather(1, top_txt).any(dim=1).float().mean().item()
    for k in ks:
        top_img = sim.topk(min(k, n_img), dim=0).indices  # [k, n_txt]
        out[f"IR@{k}"] = 100.0 * (top_img == own_img[None, :]).any(dim=0).float().mean().item()
    out["mean"] = sum(out.values()) / len(out)
    return out


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Iterable[int] = (1, 5)) -> dict[str, float]:
    """Top-k classification accuracy (percent); k is clipped to the number of classes, so "top5"
    on a 3-class problem is 100."""
    if logits.dim() != 2 or labels.dim() != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"need logits [N, C] and labels [N], got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("no samples to score")
    labels = labels.to(logits.device)
    out = {}
    for k in ks:
        top = logits.topk(min(k, logits.shape[1]), dim=1).indices
        out[f"top{k}"] = 100.0 * (top == labels[:, None]).any(dim=1).float().mean().item()
    return out
