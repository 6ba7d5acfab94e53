"""The BPE text tokenizer (§2.1): Qwen2 file format, official special tokens, one-to-many masking."""
import json

import pytest

from minicosy.config import get_config
from minicosy.text_tokenizer import (COSYVOICE_SPECIAL_TOKENS, QWEN_SPECIAL_TOKENS, TextTokenizer, UnitTokenizer,
                                     corpus_texts, load_text_tokenizer)
from minicosy.textnorm import HAN_RE, normalize_text, split_sentences

from .conftest import ROOT


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [ln for lang in ("en", "zh", "ja", "ko")
             for ln in (ROOT / "data" / "texts" / f"{lang}.txt").read_text(encoding="utf-8").splitlines()]
    return TextTokenizer.train(texts, vocab_size=2000, out_dir=tmp_path_factory.mktemp("bpe"))


def test_qwen2_file_format_and_special_tokens(tok, tmp_path):
    folder = tok.hf.name_or_path
    config = json.loads(open(f"{folder}/tokenizer_config.json").read())
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    ids = tok.special_token_ids
    order = QWEN_SPECIAL_TOKENS + COSYVOICE_SPECIAL_TOKENS
    assert [ids[t] for t in order] == list(range(ids["<|endoftext|>"], ids["<|endoftext|>"] + len(order)))
    assert ids["<|endoftext|>"] == 2000 - 3 and len(tok) == 2000 + len(COSYVOICE_SPECIAL_TOKENS)
    assert tok.encode("<|endofprompt|>") == [ids["<|endofprompt|>"]]
    assert tok.hf.eos_token == tok.hf.pad_token == "<|endoftext|>"


def test_plain_encoding_adds_nothing_and_round_trips(tok):
    for text in ["Hello, world! 123", "我们今天去公园玩，好吗？", "今日は東京へ行きました。", "안녕하세요 여러분",
                 "Please speak fast.<|endofprompt|>今天天气很好"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert ids[0] != tok.special_token_ids["<|endoftext|>"] and ids[-1] != tok.special_token_ids["<|endoftext|>"]


def test_one_to_many_masking(tok):
    text = "我们今天去公园玩，好吗？"
    tok.mask_multichar_cjk = False
    raw = tok.tokens(text)
    tok.mask_multichar_cjk = True
    masked = tok.tokens(text)
    assert any(len(HAN_RE.findall(t)) > 1 for t in raw), "this BPE should merge Chinese characters"
    assert all(len(HAN_RE.findall(t)) <= 1 for t in masked)
    assert len(tok.encode(text)) > len(tok.hf.encode(text, add_special_tokens=False))
    zh = (ROOT / "data" / "texts" / "zh.txt").read_text(encoding="utf-8").splitlines()
    assert all(len(HAN_RE.findall(tok.decode([i]))) <= 1 for line in zh[:100] for i in tok.encode(line))


def test_other_languages_are_untouched(tok):
    for text in ["The quick brown fox.", "今日は東京へ行きました。", "안녕하세요 여러분"]:
        assert tok.encode(text) == tok.hf.encode(text, add_special_tokens=False)


def test_bad_and_empty_input(tok):
    assert tok.encode("") == [] and tok.encode("   \n") == []
    for bad in (None, 3, b"bytes"):
        with pytest.raises(ValueError, match="must be a str"):
            tok.encode(bad)
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        TextTokenizer.from_pretrained(ROOT / "data" / "texts")


def test_normalisation_and_sentence_splitting():
    assert normalize_text("I have 3 cats.") == "I have three cats."
    assert normalize_text("我有2个苹果 ， 花了3.5元（很贵），") == "我有两个苹果，花了三点五元很贵。"
    assert normalize_text("用四川话说<|endofprompt|>3个") == "用四川话说<|endofprompt|>3个"
    long_en = " ".join(f"This is sentence number {i}." for i in range(40))
    parts = split_sentences(long_en, max_len=30)
    assert len(parts) > 1 and all(len(p.split()) <= 30 for p in parts)
    assert " ".join(parts) == long_en
    parts = split_sentences("今天天气很好。" * 30, max_len=40)
    assert all(len(p) <= 40 for p in parts) and "".join(parts) == "今天天气很好。" * 30
    assert split_sentences("...") == []


@pytest.fixture(scope="module")
def units(tmp_path_factory):
    return UnitTokenizer.train(corpus_texts(ROOT / "data" / "texts"), tmp_path_factory.mktemp("units"))


def test_reading_units_say_how_the_text_sounds(units):
    """The tiny preset's text units: phones with word boundaries, prosodic punctuation, CJK
    reading units, special tokens kept whole; an unseen English word still has its phones."""
    assert units.tokens("Hello, world!") == ["HH", "AH", "L", "OW", ",", "W", "ER", "L", "D", "!"]
    ids = units.special_token_ids
    text = "Speak fast.<|endofprompt|>The <strong>train</strong> left[breath]."
    got = units.tokens(text)
    assert got[:9] == ["S", "P", "IY", "K", "▁", "F", "AE", "S", "T"] and got[9:11] == [".", "<|endofprompt|>"]
    assert got[11:] == ["DH", "AH", "▁", "<strong>", "T", "R", "EY", "N", "</strong>", "▁", "L", "EH", "F", "T",
                        "[breath]", "."]
    assert units.encode("<|endofprompt|>") == [ids["<|endofprompt|>"]]
    assert units.tokens("我们明天见。") == ["w", "o3", "m", "en5", "m", "ing2", "t", "ian1", "j", "ian4", "."]
    assert units.tokens("ありがとう") == ["ア", "リ", "ガ", "ト", "ー"]
    assert units.tokens("zyzzogeton") and units.encode("  ") == []      # not in the training text
    assert max(units.encode(text)) < len(units) < 700
    assert units.encode("On 3 May", normalize=True) == units.encode("On three May")
    with pytest.raises(ValueError, match="must be a str"):
        units.encode(b"bytes")


def test_the_saved_folder_says_which_text_units(units, tok):
    assert isinstance(load_text_tokenizer(units.folder), UnitTokenizer)
    assert load_text_tokenizer(units.folder).vocab == units.vocab
    assert isinstance(load_text_tokenizer(tok.hf.name_or_path), TextTokenizer)
    assert get_config("tiny").text.units in ("bpe", "phone") and get_config("cosyvoice2_0p5b").text.units == "bpe"
