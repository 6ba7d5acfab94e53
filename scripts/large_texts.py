#!/usr/bin/env python3
"""Write the English sentences of the large corpus (``python -m minicosy.data build --size large``)
into ``data/texts/large/``, from two Debian packages whose text may be used for any purpose:

* ``wordnet-base`` -- the example sentences of WordNet 3.0's glosses (the WordNet 3.0 licence:
  use and redistribution for any purpose, with its copyright notice; see SOURCES.md);
* ``sword-text-web`` -- the World English Bible (public domain), split into sentences.

Both are fetched with ``apt-get download`` (not installed) unless their files are already on the
system. Sentences are kept when they have 5-25 words, only letters and plain punctuation (no
digits, no all-capitals words, no ellipses or dashes, balanced quotes), at most two capitalised
words after the first (genealogies and lists of names are not what a tiny model should learn),
and are not among the project's own sentences (``data/texts/en.txt``: the evaluation sentences
stay unseen). Duplicates (ignoring case and punctuation) are dropped. Run once; the output is
committed, so building the large corpus needs neither package.

    python scripts/large_texts.py
"""
from __future__ import annotations

import re
import struct
import subprocess
import tempfile
import unicodedata
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "data" / "texts" / "large"
WORDNET = "usr/share/wordnet"
WEB = "usr/share/sword/modules/texts/ztext/engWEB2015eb"
PLAIN = {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2014": ", ", "\u2013": "-", "\u00a0": " ",
         "`": "'"}
ALLOWED = re.compile(r"""["']?[A-Z][A-Za-z ,;:'"!?.\-]*[.!?]["']?""")
ABBREVIATION = re.compile(r"\b(Mr|Mrs|Ms|Dr|St|Jr|Sr|Prof|Rev|Gen|Col|Capt|Lt|vs|etc|viz|cf|i\.e|e\.g|No)\.$", re.I)


def unpacked(package: str, inner: str, tmp: Path) -> Path:
    """The package's folder ``inner``: on the system if installed, else from its downloaded .deb."""
    if (Path("/") / inner).exists():
        return Path("/") / inner
    subprocess.run(["apt-get", "download", package], cwd=tmp, check=True, capture_output=True)
    deb = next(tmp.glob(f"{package}_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / package)], check=True)
    return tmp / package / inner


def plain(text: str) -> str:
    for a, b in PLAIN.items():
        text = text.replace(a, b)
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return re.sub(r"\s+", " ", re.sub(r"\s+,", ",", text)).strip()


def key(sentence: str) -> str:
    return re.sub(r"[^a-z ]", "", sentence.lower()).strip()


def speakable(s: str) -> bool:
    words = s.split()
    return (5 <= len(words) <= 25 and ALLOWED.fullmatch(s) is not None and s.count('"') % 2 == 0
            and ".." not in s and " - " not in s and not re.search(r"\b[A-Z]{2,}\b", s)
            and sum(w[0].isupper() for w in words[1:]) <= 2)


def wordnet_examples(folder: Path):
    """The quoted examples after ``|`` in each synset line of ``data.{noun,verb,adj,adv}``."""
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (folder / f"data.{pos}").read_text(encoding="latin-1").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue
            for example in re.findall(r'"([^"]+)"', line.split("|", 1)[1]):
                example = example.strip()
                if example:
                    yield example[0].upper() + example[1:] + ("" if example[-1] in ".!?" else ".")


def sword_ztext(prefix: Path):
    """A SWORD zText module's text: index ``.bzs`` (offset, size, unpacked size) into zlib blocks ``.bzz``."""
    index, blocks = prefix.with_suffix(".bzs").read_bytes(), prefix.with_suffix(".bzz").read_bytes()
    for i in range(0, len(index), 12):
        offset, size, _ = struct.unpack("<III", index[i:i + 12])
        if size:
            yield zlib.decompress(blocks[offset:offset + size]).decode("utf-8", "replace")


def bible_sentences(folder: Path):
    """World English Bible sentences: OSIS notes and titles dropped, other markup stripped."""
    for part in ("ot", "nt"):
        for block in sword_ztext(folder / part):
            block = re.sub(r"<note\b.*?</note>", " ", block, flags=re.S)
            block = re.sub(r"<title\b.*?</title>", " . ", block, flags=re.S)
            block = re.sub(r"</?(w|q|seg|rdg|reference)\b[^>]*>", "", block)
            text, pending = plain(re.sub(r"<[^>]+>", " ", block)), ""
            for piece in re.split(r"""(?:(?<=[.!?])|(?<=[.!?]["']))\s+(?=["']?[A-Z])""", text):
                pending = f"{pending} {piece}".strip()
                if not ABBREVIATION.search(pending):
                    yield pending
                    pending = ""


def keep(sentences, seen: set[str]) -> list[str]:
    kept = []
    for s in map(plain, sentences):
        if speakable(s) and key(s) not in seen:
            seen.add(key(s))
            kept.append(s)
    return kept


def main() -> None:
    own = {key(s) for s in (ROOT / "data" / "texts" / "en.txt").read_text(encoding="utf-8").splitlines()}
    seen = set(own)
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        sources = {"en_wordnet.txt": keep(wordnet_examples(unpacked("wordnet-base", WORDNET, Path(tmp))), seen),
                   "en_bible.txt": keep(bible_sentences(unpacked("sword-text-web", WEB, Path(tmp))), seen)}
    for name, sentences in sources.items():
        (OUT / name).write_text("\n".join(sentences) + "\n", encoding="utf-8")
        print(f"{name}: {len(sentences)} sentences, {sum(len(s.split()) for s in sentences) / len(sentences):.1f} words on average")


if __name__ == "__main__":
    main()
