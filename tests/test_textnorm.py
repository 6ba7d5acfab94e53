"""Number reading for the corpus engines and for WER (zh, en), and Hanzi -> pinyin for espeak-ng."""
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minicosy.textnorm import en_numbers_to_words, hanzi_to_pinyin, int_to_hanzi, zh_numbers_to_hanzi

_VAL = {c: i for i, c in enumerate("零一二三四五六七八九")}
_UNIT = {"十": 10, "百": 100, "千": 1000}
_BIG = {"万": 10**4, "亿": 10**8}


def _parse_hanzi(s: str) -> int:
    """An independent reader of Chinese numerals, for the round trip."""
    total, section, digit = 0, 0, 0
    for ch in s:
        if ch in _VAL:
            digit = _VAL[ch]
        elif ch in _UNIT:
            section += (digit or 1) * _UNIT[ch]
            digit = 0
        elif ch in _BIG:
            total = (total + section + digit) * _BIG[ch] if ch == "亿" else total + (section + digit) * _BIG[ch]
            section = digit = 0
    return total + section + digit


@given(st.integers(min_value=0, max_value=10**12 - 1))
def test_int_to_hanzi_round_trips(n):
    text = int_to_hanzi(n)
    assert not re.search(r"\d", text)
    assert _parse_hanzi(text) == n


@pytest.mark.parametrize("n,expected", [(0, "零"), (10, "十"), (15, "十五"), (105, "一百零五"),
                                        (1205, "一千二百零五"), (10005, "一万零五"), (200000, "二十万"),
                                        (100010000, "一亿零一万")])
def test_int_to_hanzi_examples(n, expected):
    assert int_to_hanzi(n) == expected


def test_zh_numbers_in_context():
    assert zh_numbers_to_hanzi("我买了2个苹果，花了3.5元，占85%。") == "我买了两个苹果，花了三点五元，占百分之八十五。"
    assert zh_numbers_to_hanzi("2024年有1500人") == "二零二四年有一千五百人"
    assert zh_numbers_to_hanzi("7点30分") == "七点三十分"


def test_pinyin_has_no_hanzi_and_marks_tones():
    out = hanzi_to_pinyin("我们绿色的女孩，你好吗？3个人。")
    assert not re.search(r"[\u4e00-\u9fff]", out)
    assert out.startswith("wo3 men5 lv4 se4 de5 nv3 hai2, ni3 hao3 ma5?")
    assert "san1 ge4 ren2." in out


@pytest.mark.parametrize("text,expected", [
    ("At 7:45 he paid $12.50.", "At seven forty-five he paid twelve dollars fifty cents."),
    ("In 1987, 40% of 14,000 people", "In nineteen eighty-seven, forty percent of fourteen thousand people"),
    ("the 21st floor, 2.5 km, at 10:05", "the twenty-first floor, two point five km, at ten oh five"),
    ("call 0800 now", "call zero eight zero zero now"),
    ("in 2005 and 1900", "in two thousand five and nineteen hundred"),
])
def test_en_numbers_to_words(text, expected):
    assert en_numbers_to_words(text) == expected
