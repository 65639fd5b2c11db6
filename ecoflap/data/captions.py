"""Caption and question text as the BLIP / BLIP-2 code (LAVIS) prepares it, for calibration,
retrieval and VQA."""
from __future__ import annotations

import re

_BLIP_PUNCT = re.compile(r"([.!\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")


def blip_pre_caption(caption: str, max_words: int = 50) -> str:
    """LAVIS's BlipCaptionProcessor.pre_caption (the `blip_caption` text processor of its
    retrieval and CC3M datasets): lower case, each of . ! " ( ) * # : ; ~ replaced by a space,
    runs of whitespace collapsed, outer spaces stripped, then cut to `max_words` words."""
    caption = _SPACES.sub(" ", _BLIP_PUNCT.sub(" ", caption.lower()))
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


def blip_pre_question(question: str, max_words: int = 50) -> str:
    """LAVIS's BlipQuestionProcessor.pre_question (the `blip_question` text processor of its
    VQAv2, OK-VQA and GQA evaluation configs, which BLIP's and BLIP-2's published VQA numbers
    went through): lower case, each of . ! " ( ) * # : ; ~ deleted (the question mark stays),
    trailing spaces stripped, then cut to `max_words` words."""
    question = _BLIP_PUNCT.sub("", question.lower()).rstrip(" ")
    words = question.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else question
