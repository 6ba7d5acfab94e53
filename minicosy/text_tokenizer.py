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
from collections.abc import Iterable
from pathlib import Path

from .textnorm import HAN_RE, KANA_RE, normalize_text

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


def corpus_texts(texts_dir: str | Path = "data/texts") -> list[str]:
    """The shipped sentences of every language, in a fixed order (the tiny BPE's training text)."""
    return [ln.strip() for lang in ("en", "zh", "ja", "ko")
            for ln in (Path(texts_dir) / f"{lang}.txt").read_text(encoding="utf-8").splitlines() if ln.strip()]


def train_main(argv: list[str] | None = None) -> None:
    """``python -m minicosy.train text_tokenizer [--vocab-size 2000] [--out DIR]``."""
    import argparse

    from .config import get_config

    p = argparse.ArgumentParser(prog="python -m minicosy.train text_tokenizer")
    p.add_argument("--vocab-size", type=int, default=get_config("tiny").text.vocab_size)
    p.add_argument("--texts", default="data/texts")
    p.add_argument("--out", default="data/checkpoints/text_tokenizer")
    a = p.parse_args(argv)
    tok = TextTokenizer.train(corpus_texts(a.texts), a.vocab_size, a.out)
    print(f"wrote {a.out}: {len(tok)} tokens ({a.vocab_size} BPE + Qwen specials, "
          f"{len(COSYVOICE_SPECIAL_TOKENS)} CosyVoice specials)")
