"""Text sources: the embedded public-domain excerpts, and the real datasets users run online."""
from __future__ import annotations

import re
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"

EMBEDDED_TEXTS = {
    "austen-emma": ASSETS / "calibration" / "austen_emma.txt",
    "brown-heldout": ASSETS / "evaluation" / "brown_heldout.txt",
}


def embedded_text(name: str) -> str:
    if name not in EMBEDDED_TEXTS:
        raise ValueError(f"unknown embedded text {name!r}; available: {', '.join(EMBEDDED_TEXTS)}")
    return EMBEDDED_TEXTS[name].read_text(encoding="utf-8")


C4_TRAIN_SHARD = "en/c4-train.00000-of-01024.json.gz"  # Wanda's and SparseGPT's calibration
C4_VALIDATION_SHARD = "en/c4-validation.00000-of-00008.json.gz"  # the authors' FlanT5 calibration


def embedded_paragraphs(name: str, min_words: int = 20) -> list[str]:
    """An embedded text's paragraphs of at least `min_words` words, in order (the documents
    of the seq2seq calibration offline; headings and short lines left out)."""
    return [p for p in re.split(r"\n\s*\n", embedded_text(name)) if len(p.split()) >= min_words]


def c4_documents(shard: str = C4_TRAIN_SHARD, split: str = "train") -> list[str]:
    """A C4 shard's documents in file order (needs network the first time)."""
    from datasets import load_dataset  # optional (C4 / WikiText only); not in the core environment

    try:
        ds = load_dataset("allenai/c4", data_files={split: shard}, split=split)
    except Exception as exc:
        raise RuntimeError(f"could not load C4 shard {shard} ({exc}). It needs network access once "
                           "(then the datasets cache); offline, use calibration.source: austen-emma") from exc
    return ds["text"]


def wikitext2_test() -> str:
    """WikiText-2 raw test split joined as Wanda's get_wikitext2 does, with blank lines
    ("\n\n".join; needs network the first time)."""
    from datasets import load_dataset  # optional (C4 / WikiText only); not in the core environment

    try:
        ds = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    except Exception as exc:
        raise RuntimeError(f"could not load wikitext-2-raw-v1 ({exc}). It needs network access once; "
                           "offline, use evaluation.perplexity.dataset: brown-heldout") from exc
    return "\n\n".join(ds["text"])
