"""Task metrics for the multimodal evaluations: VQA accuracy (VQAv2 protocol), GQA exact match,
COCO caption metrics (pycocoevalcap), image-text retrieval recall@K and top-K classification accuracy.

Every number is a percentage (0-100), as the papers report them. A metric that cannot run here is
reported as ``{"skipped": reason}``, never as a silent zero.
"""
from __future__ import annotations

import importlib
import os
import re
import shutil
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Hashable

import torch
from ecoflap.utils.runtime import check_finite


def _coco(module: str, name: str | None = None) -> Any:
    """A module of pycocoevalcap (or a class in it), imported when a caption is scored: VQA,
    retrieval and classification (and a GPU machine without the package) never need it."""
    try:
        found = importlib.import_module(f"pycocoevalcap.{module}")
    except ImportError as exc:
        raise RuntimeError("caption metrics need pycocoevalcap: pip install pycocoevalcap==1.2 "
                           "(envs/requirements-common.txt)") from exc
    return found if name is None else getattr(found, name)


# a diverged model's NaN scores rank in index order under topk, which reads as a plausible recall or accuracy
DIVERGED = "the pruned model diverged; check the pruning log"

# ----------------------------------------------------------------------------------------------------
# VQA accuracy, exactly as the code behind the published numbers computes it
#
# The rules below are those of GT-Vision-Lab/VQA's PythonEvaluationTools/vqaEvaluation/vqaEval.py.
# That file exists in two versions that score many answers differently:
#   * "vqaeval2016" (commit 458a8b2, Oct 2016; LAVIS's lavis/common/vqa_tools/vqa_eval.py is this
#     logic unchanged, and LAVIS produced BLIP-2's and ECoFLaP's VQAv2 / OK-VQA numbers): the
#     prediction is always normalised (punctuation, then number words, articles, contractions,
#     lower case); the human answers only get their punctuation processed, and only when they
#     disagree, so a unanimous "yes" x10 stays raw and "two" never becomes "2" on that side.
#   * "vqaeval2021" (commit a013f00, Mar 2021, the repository's HEAD): both sides are stripped;
#     when the humans disagree both are fully normalised, when they agree neither is, so a
#     unanimous question is a case-sensitive exact match ("Yes" scores 0 against ten "yes").
# Both average min(1, matches / 3) over the leave-one-annotator-out subsets; with a single
# reference answer the only subset is empty, so the question scores 0 (not exact match).
# ----------------------------------------------------------------------------------------------------

# The published contraction table, entries as in vqaEval.py (capitalised keys that can never match
# lower-cased text, "somebody'd" -> "somebodyd", and the three "'ow's'at" spellings included).
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
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
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

VQA_PROTOCOLS = ("vqaeval2016", "vqaeval2021", "textvqa_m4c")
GQA_PROTOCOLS = ("lavis_gqa", "lavis_gqa_2023_12")


def process_punctuation(text: str) -> str:
    """vqaEval.py's processPunctuation: each listed mark is deleted when it touches a space in the
    input (or the input has a "1,000"-style number anywhere), else replaced by a space ("yes!" ->
    "yes " with its trailing space); then periods not followed by a digit go (at most 32)."""
    out = text
    has_number_comma = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        if p + " " in text or " " + p in text or has_number_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """vqaEval.py's processDigitArticle: lower case, number words to digits, articles dropped,
    apostrophe-less contractions restored, words re-joined by single spaces."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_vqa_answer(answer: str) -> str:
    """The full normalisation vqaEval.py applies to a prediction (always, in the 2016 logic):
    newline/tab to space, strip, processPunctuation, processDigitArticle."""
    return process_digit_article(process_punctuation(_clean_whitespace(answer)))


def _leave_one_out(prediction: str, gts: Sequence[str]) -> float:
    # every annotator left out in turn (answer ids are unique, so exactly one answer is removed)
    n_match = sum(g == prediction for g in gts)
    return sum(min(1.0, (n_match - (g == prediction)) / 3.0) for g in gts) / len(gts)


def evalai_answer(text: str) -> str:
    """EvalAI's answer processor, which TextVQA's official evaluation (m4c_evaluator's
    TextVQAAccuracyEvaluator, as LLaVA runs it) applies to the prediction and to every human answer:
    lower case, commas and question marks dropped, "'s" split off, then vqaEval's punctuation, digit
    and article rules."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return process_digit_article(process_punctuation(_clean_whitespace(text)))


def vqa_accuracy(prediction: str, gt_answers: Sequence[str], protocol: str = "vqaeval2016") -> float:
    """One question's VQA accuracy in [0, 1] under `protocol` (see the module notes above)."""
    if isinstance(gt_answers, str) or len(gt_answers) == 0:
        raise ValueError("gt_answers must be a non-empty list of strings")
    gts = list(gt_answers)
    if protocol == "vqaeval2016":
        pred = normalize_vqa_answer(prediction)
        if len(set(gts)) > 1:
            gts = [process_punctuation(g) for g in gts]
    elif protocol == "textvqa_m4c":  # every answer processed; the mean over leaving each annotator out
        if len(gts) != 10:
            raise ValueError(f"TextVQA's evaluation expects 10 answers per question, got {len(gts)}")
        gts = [evalai_answer(g) for g in gts]
        pred = evalai_answer(prediction)
    elif protocol == "vqaeval2021":
        gts = [_clean_whitespace(g) for g in gts]
        pred = _clean_whitespace(prediction)
        if len(set(gts)) > 1:
            gts = [process_digit_article(process_punctuation(g)) for g in gts]
            pred = process_digit_article(process_punctuation(pred))
    else:
        raise ValueError(f"unknown VQA protocol {protocol!r} (allowed: {', '.join(VQA_PROTOCOLS)})")
    return _leave_one_out(pred, gts)


def gqa_accuracy(prediction: str, answer: str, protocol: str = "lavis_gqa") -> float:
    """GQA exact match as LAVIS's GQATask scores generated answers: "lavis_gqa" (the ECoFLaP fork,
    and LAVIS from Feb to Dec 2023) normalises the prediction only and compares it with the raw
    answer; "lavis_gqa_2023_12" (LAVIS 71a2da9 on) normalises both."""
    pred = process_digit_article(process_punctuation(prediction))
    if protocol == "lavis_gqa":
        return float(pred == answer)
    if protocol == "lavis_gqa_2023_12":
        return float(pred == process_digit_article(process_punctuation(answer)))
    raise ValueError(f"unknown GQA protocol {protocol!r} (allowed: {', '.join(GQA_PROTOCOLS)})")


def vqa_scores(preds: Mapping[Hashable, str], answers: Mapping[Hashable, Sequence[str]],
               protocol: str = "vqaeval2016") -> dict[str, float | int | str]:
    """Dataset-level accuracy (percent) over the questions in `answers`, as the reference prints it:
    VQAEval rounds the overall accuracy to 2 decimals; LAVIS's GQATask reports the plain mean.

    `protocol` is a VQA protocol (soft accuracy over the human answers) or a GQA protocol (exact
    match against the single answer). Predictions for questions not in `answers` are ignored;
    a question without a prediction is an error, because scoring it as wrong would hide a bug.
    """
    if protocol not in VQA_PROTOCOLS + GQA_PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r} (allowed: {', '.join(VQA_PROTOCOLS + GQA_PROTOCOLS)})")
    if not answers:
        raise ValueError("no questions to score (answers is empty)")
    missing = [q for q in answers if q not in preds]
    if missing:
        raise ValueError(f"{len(missing)} question id(s) have no prediction, e.g. {missing[:5]}")
    scores = []
    for qid, gts in answers.items():
        gts = [gts] if isinstance(gts, str) else list(gts)
        if protocol in GQA_PROTOCOLS:
            if len(gts) != 1:
                raise ValueError(f"question {qid!r}: GQA has one answer per question, got {len(gts)}")
            scores.append(gqa_accuracy(preds[qid], gts[0], protocol))
        else:
            scores.append(vqa_accuracy(preds[qid], gts, protocol))
    mean = 100.0 * sum(scores) / len(scores)
    return {"accuracy": round(mean, 2) if protocol in VQA_PROTOCOLS else mean, "n": len(scores),
            "protocol": protocol}


def lemmatize_answers(answers: Mapping[Hashable, str], nlp: Any = None) -> dict[Hashable, str]:
    """BLIP-2's `_lemmatize` (apply_lemmatizer, set in LAVIS's OK-VQA FlanT5 eval config): spaCy
    en_core_web_sm replaces each NOUN and VERB token by its lemma and re-joins all tokens with
    spaces (so "don't" becomes "do n't"). `nlp` defaults to spacy.load("en_core_web_sm")."""
    if nlp is None:
        try:  # optional: only OK-VQA's lemmatised protocol needs spaCy and its English model
            import spacy

            nlp = spacy.load("en_core_web_sm")
        except (ImportError, OSError) as exc:
            raise RuntimeError("lemmatize: true needs spaCy and its en_core_web_sm model, as BLIP-2's OK-VQA "
                               "evaluation used them: pip install spacy && python -m spacy download en_core_web_sm "
                               f"(or set lemmatize: false and note the difference) ({exc})") from exc
    out = {}
    for key, answer in answers.items():
        out[key] = " ".join(t.lemma_ if t.pos_ in ("NOUN", "VERB") else t.text for t in nlp(answer))
    return out


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
        ptb = _coco("tokenizer.ptbtokenizer", "PTBTokenizer")()
        out = ptb.tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
        if any(len(out.get(k, ())) != len(v) for k, v in captions.items()):
            raise RuntimeError("PTBTokenizer returned a different number of captions than it was given")
        return out
    return {k: [simple_tokenize(c) for c in v] for k, v in captions.items()}


def _spice_lib_dir() -> str:
    # pycocoevalcap is a namespace package (no __init__.py, so no __file__); spice/ is a package
    downloader = _coco("spice.get_stanford_models")
    return os.path.join(os.path.dirname(os.path.abspath(downloader.__file__)), "lib")


def _run_meteor(gts: dict, res: dict) -> float:
    """METEOR 1.5 through pycocoevalcap's long-lived java process, with a watchdog so a stuck
    subprocess fails loudly instead of hanging, and cleanup that avoids its __del__ deadlock."""

    meteor = _coco("meteor.meteor", "Meteor")()
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
                    spice: bool = True, meteor: bool = True) -> dict[str, Any]:
    """COCO caption metrics (x100): BLEU-1..4, METEOR, ROUGE_L, CIDEr (CIDEr-D, corpus IDF), SPICE.

    Tokenisation is pycocoevalcap's Stanford PTBTokenizer when `java` is on PATH, else
    `simple_tokenize` (recorded under "tokenizer"). METEOR needs Java; SPICE needs Java plus the
    Stanford CoreNLP 3.6.0 jars, which pycocoevalcap would otherwise try to download; a metric that
    cannot run is reported as {"skipped": reason}.
    """

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

    bleu, _ = _coco("bleu.bleu", "Bleu")(4).compute_score(gts, res, verbose=0)
    for n, b in enumerate(bleu, start=1):
        result[f"BLEU-{n}"] = 100.0 * float(b)
    if meteor:
        result["METEOR"] = 100.0 * _run_meteor(gts, res) if java else {"skipped": METEOR_SKIP}
    result["ROUGE_L"] = 100.0 * float(_coco("rouge.rouge", "Rouge")().compute_score(gts, res)[0])
    result["CIDEr"] = 100.0 * float(_coco("cider.cider", "Cider")().compute_score(gts, res)[0])

    if spice:
        lib = _spice_lib_dir()
        if not all(os.path.exists(os.path.join(lib, j)) for j in SPICE_JARS):
            result["SPICE"] = {"skipped": f"needs Stanford CoreNLP 3.6.0 jars in {lib}; run pycocoevalcap's "
                                          "get_stanford_models once online"}
        elif not java:
            result["SPICE"] = {"skipped": "needs java on PATH (apt install default-jre-headless)"}
        else:
            result["SPICE"] = 100.0 * float(_coco("spice.spice", "Spice")().compute_score(gts, res)[0])
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
    check_finite(sim, "the retrieval similarity matrix", DIVERGED)
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
    check_finite(logits, "the classification logits", DIVERGED)
    labels = labels.to(logits.device)
    out = {}
    for k in ks:
        top = logits.topk(min(k, logits.shape[1]), dim=1).indices
        out[f"top{k}"] = 100.0 * (top == labels[:, None]).any(dim=1).float().mean().item()
    return out
