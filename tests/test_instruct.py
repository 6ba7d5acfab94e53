"""Instruct sub-corpus (§2.6): templates, the plan, the built manifest, and the measuring functions
of the instruction score checked on synthetic signals of known rate, pitch and emphasis."""
import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch

from minicosy.config import CorpusConfig
from minicosy.data import (INSTRUCT_DIR, instruct_pools, large_instruct_pools, load_manifest, plan_instruct, plan_large,
                           read_large_texts, read_texts)
from minicosy.engines import VOICES, engine_available, synthesize
from minicosy.instruct import (CONDITIONS, END_OF_PROMPT, TEMPLATES, emphasis_contrast, instruction, mark_word,
                               median_f0, render_voice, semitones, speech_duration, speech_span, unsupported,
                               word_window)
from minicosy.lm_train import lm_examples
from minicosy.text_tokenizer import TextTokenizer

from .conftest import ROOT

SR = 16000
INSTRUCT_FIELDS = {"instruction", "condition", "rate", "semitones", "emphasis_word", "plain_text", "neutral_id"}


def harmonic(f0: float, seconds: float, amp: float = 0.3, sr: int = SR) -> np.ndarray:
    """A voiced-like tone: the first five harmonics of ``f0`` with falling amplitude."""
    t = np.arange(int(seconds * sr)) / sr
    return amp * sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 6)).astype(np.float32) / 2


def padded(x: np.ndarray, lead: float = 0.4, tail: float = 0.6, sr: int = SR) -> np.ndarray:
    return np.concatenate([np.zeros(int(lead * sr), np.float32), x, np.zeros(int(tail * sr), np.float32)])


# ----- templates and the plan --------------------------------------------------------------------
def test_instruction_templates():
    for name in TEMPLATES:
        assert set(TEMPLATES[name]) == {"en", "zh"}
        for lang in ("en", "zh"):
            texts = {instruction(name, lang, k) for k in range(3)}
            assert len(texts) >= 2 and all(t.endswith(END_OF_PROMPT) and t.count(END_OF_PROMPT) == 1 for t in texts)
    assert instruction("neutral") == "" and instruction("emphasis") == ""
    with pytest.raises(ValueError, match="unknown condition"):
        instruction("whisper")
    tok = TextTokenizer.from_pretrained(ROOT / "data" / "checkpoints" / "text_tokenizer")
    ids = tok.encode(instruction("very_fast"), normalize=False)
    assert ids[-1] == tok.special_token_ids[END_OF_PROMPT]          # one special token, not its characters


def test_engine_controls():
    espeak = next(v for v in VOICES if v.name == "espeak_en_us_f")
    fast = render_voice(espeak, CONDITIONS["very_fast"])
    assert fast.params["speed"] == round(espeak.params["speed"] * 1.6) and fast.name == espeak.name
    assert render_voice(espeak, CONDITIONS["high_pitch"]).params["prosody_pitch"] == "+33%"     # 2^(5/12) - 1
    piper = next(v for v in VOICES if v.engine == "piper")
    assert render_voice(piper, CONDITIONS["slow"]).params["length_scale"] == 1.25
    assert render_voice(piper, CONDITIONS["low_pitch"]) is None and "no pitch" in unsupported(piper, CONDITIONS["low_pitch"])
    jtalk = next(v for v in VOICES if v.engine == "openjtalk")
    assert render_voice(jtalk, CONDITIONS["high_pitch"]).params["half_tone"] == jtalk.params["half_tone"] + 5
    zh = next(v for v in VOICES if v.name == "espeak_zh_f")
    assert "pinyin" in unsupported(zh, CONDITIONS["emphasis"])


@pytest.mark.skipif(not engine_available("espeak"), reason="espeak-ng not installed")
def test_espeak_renders_rate_and_pitch():
    voice = next(v for v in VOICES if v.name == "espeak_en_sc_m")
    text = "The quick brown fox jumps over the lazy dog near the river bank."
    out = {c: synthesize(render_voice(voice, CONDITIONS[c]), text) for c in ("neutral", "very_fast", "high_pitch")}
    dur = {c: speech_duration(*out[c]) for c in out}
    assert 1.3 < dur["neutral"] / dur["very_fast"] < 1.9
    assert semitones(median_f0(*out["high_pitch"]), median_f0(*out["neutral"])) > 1.0
    said, word = mark_word(text, __import__("random").Random(0))
    assert f"<strong>{word}</strong>" in said
    wav, sr = synthesize(voice, said)               # SSML emphasis, not the tags read aloud
    assert 0.8 < speech_duration(wav, sr) / dur["neutral"] < 1.3


def test_plan_pairs_every_rendering_with_its_neutral_twin():
    cfg = CorpusConfig()
    texts = read_texts(ROOT / "data" / "texts")
    voices = [dataclasses.replace(v) for v in VOICES]
    jobs, skipped = plan_instruct(instruct_pools(texts, cfg), voices, cfg)
    again, _ = plan_instruct(instruct_pools(texts, cfg), voices, cfg)
    assert [(j.id, j.text, j.extra) for j in jobs] == [(j.id, j.text, j.extra) for j in again]
    ids = {j.id for j in jobs}
    assert len(ids) == len(jobs)
    for j in jobs:
        extra = dict(j.extra)
        assert extra["neutral_id"] in ids and extra["neutral_id"].startswith(j.voice.name + "-")
        assert not j.voice.heldout and j.split == "train"
        assert not unsupported(j.voice, CONDITIONS[extra["condition"]])
    per_lang = Counter((j.voice.lang, dict(j.extra)["condition"]) for j in jobs)
    for lang, n in cfg.instruct_sentences:
        for c in ("neutral", "very_slow", "slow", "fast", "very_fast", "high_pitch", "low_pitch"):
            assert per_lang[(lang, c)] >= n, (lang, c)
    assert per_lang[("en", "emphasis")] == dict(cfg.instruct_sentences)["en"]
    assert {(s["engine"], s["condition"]) for s in skipped} >= {("piper (en)", "high_pitch"), ("espeak (zh)", "emphasis")}


def test_large_instruct_draws_only_training_sentences_of_the_large_corpus():
    """The large instruct sub-corpus (``build --size large``) takes ``large_instruct`` English
    sentences that the large corpus renders for training, never a dev or ``eval`` one."""
    cfg = CorpusConfig(large_instruct=50)
    texts, large = read_texts(ROOT / "data" / "texts"), read_large_texts(ROOT / "data" / "texts")
    pools = large_instruct_pools(large, cfg)
    splits = {j.text: j.split for j in plan_large(texts, large, VOICES, cfg)}
    assert len(pools["en"]) > 15000 and all(splits[t] == "train" for _, t in pools["en"])
    jobs, _ = plan_instruct(pools, VOICES, cfg, (("en", cfg.large_instruct),))
    plain = {dict(j.extra)["plain_text"] for j in jobs}
    assert len(plain) == cfg.large_instruct and all(splits[t] == "train" for t in plain)
    per_condition = Counter(dict(j.extra)["condition"] for j in jobs)
    assert per_condition["emphasis"] == cfg.large_instruct and min(per_condition.values()) >= cfg.large_instruct


def test_lm_examples_put_the_instruction_first():
    tok = TextTokenizer.from_pretrained(ROOT / "data" / "checkpoints" / "text_tokenizer")
    rec = {"id": "a", "speaker": "s", "lang": "en", "text": "It is 5 <strong>past</strong> ten.",
           "instruction": "Please speak fast.<|endofprompt|>", "condition": "fast"}
    ex = lm_examples([rec], tok, {"a": torch.arange(7)})[0]
    head = tok.encode(rec["instruction"], normalize=False)
    assert ex["text"].tolist() == head + tok.encode("It is five <strong>past</strong> ten.", normalize=False)
    assert tok.special_token_ids["<strong>"] in ex["text"].tolist() and ex["instruct"]


# ----- the built sub-corpus ----------------------------------------------------------------------
def test_built_instruct_corpus(corpus_root):
    root = corpus_root / INSTRUCT_DIR
    if not (root / "manifest.jsonl").exists():
        pytest.skip("instruct sub-corpus not built: run `python -m minicosy.data build`")
    records = load_manifest(root)
    by_id = {r["id"]: r for r in records}
    minutes = sum(r["duration"] for r in records) / 60
    assert 15 <= minutes <= 25, minutes
    for r in records:
        assert INSTRUCT_FIELDS <= set(r) and (root / r["path"]).exists()
        cond, twin = CONDITIONS[r["condition"]], by_id[r["neutral_id"]]
        assert twin["speaker"] == r["speaker"] and twin["plain_text"] == r["plain_text"] and twin["condition"] == "neutral"
        assert (r["rate"], r["semitones"]) == (cond.rate, cond.semitones)
        if r["condition"] in TEMPLATES:
            assert r["instruction"].endswith(END_OF_PROMPT) and r["text"] == r["plain_text"]
        else:
            assert r["instruction"] == ""
        if cond.emphasis:
            assert r["text"] == r["plain_text"].replace(r["emphasis_word"], f"<strong>{r['emphasis_word']}</strong>", 1)
    # the engines did what the manifest says: durations follow the rate factors
    ratios = {}
    for r in records:
        if r["condition"] in ("very_slow", "slow", "fast", "very_fast"):
            ratios.setdefault(r["condition"], []).append(by_id[r["neutral_id"]]["duration"] / r["duration"])
    medians = {c: float(np.median(v)) for c, v in ratios.items()}
    assert medians["very_slow"] < medians["slow"] < 1 < medians["fast"] < medians["very_fast"], medians


# ----- measuring functions on synthetic signals -----------------------------------------------------
def test_speech_duration_ignores_leading_and_trailing_silence():
    tone = harmonic(150, 1.2)
    assert abs(speech_duration(padded(tone), SR) - 1.2) < 0.03
    start, end = speech_span(padded(tone, lead=0.25), SR)
    assert abs(start - 0.25) < 0.03 and abs(end - 1.45) < 0.03
    # a pause inside counts: rate is measured over the whole utterance
    gap = np.concatenate([tone[:SR // 2], np.zeros(SR // 2, np.float32), tone[:SR // 2]])
    assert abs(speech_duration(padded(gap), SR) - 1.5) < 0.03
    with pytest.raises(ValueError, match="silent"):
        speech_duration(np.zeros(SR, np.float32), SR)


@pytest.mark.parametrize("f0", [110.0, 220.0])
def test_median_f0_and_semitones(f0):
    assert abs(median_f0(padded(harmonic(f0, 1.0)), SR) / f0 - 1) < 0.01
    up = f0 * 2 ** (5 / 12)
    shift = semitones(median_f0(harmonic(up, 1.0, sr=24000), 24000), median_f0(harmonic(f0, 1.0), SR))
    assert abs(shift - 5) < 0.2
    with pytest.raises(ValueError, match="voiced"):
        median_f0(0.01 * np.random.default_rng(0).standard_normal(SR).astype(np.float32), SR)


def test_word_window_maps_letters_onto_the_speech_span():
    text = "aaaa <strong>bbbb</strong> cccccccc"
    start, end = word_window(text, "bbbb", (1.0, 5.0))
    assert (start, end) == (2.0, 3.0)                # 4 of 16 letters before, 4 inside
    with pytest.raises(ValueError, match="not in"):
        word_window(text, "dddd", (0.0, 1.0))


def test_emphasis_contrast_finds_a_louder_higher_word():
    plain = np.concatenate([harmonic(150, 0.6), harmonic(150, 0.3), harmonic(150, 0.6)])
    stressed = np.concatenate([harmonic(150, 0.6), harmonic(150 * 2 ** (3 / 12), 0.3, amp=0.6), harmonic(150, 0.6)])
    window = (0.4 + 0.6, 0.4 + 0.9)
    flat = emphasis_contrast(padded(plain), SR, window)
    loud = emphasis_contrast(padded(stressed), SR, window)
    assert abs(flat["level_db"]) < 0.5 and abs(flat["pitch_st"]) < 0.2
    assert abs(loud["level_db"] - 20 * np.log10(2)) < 0.7 and abs(loud["pitch_st"] - 3) < 0.3
    with pytest.raises(ValueError, match="too little"):
        emphasis_contrast(padded(plain), SR, (1.0, 1.001))


def test_instruction_changes_and_table():
    from minicosy.eval_instruct import _condition_change, instruction_table, quality_table, right_sign, wilson_interval

    slow, normal = padded(harmonic(150, 1.5)), padded(harmonic(150, 1.0))
    assert abs(_condition_change("very_slow", slow, normal, SR) - 1.0 / 1.5) < 0.03
    up = padded(harmonic(150 * 2 ** (4 / 12), 1.0))
    assert abs(_condition_change("high_pitch", up, normal, SR) - 4) < 0.3
    silent = np.zeros(SR, np.float32)
    assert np.isnan(_condition_change("fast", silent, normal, SR))          # unmeasurable, not a crash
    assert right_sign("very_slow", 0.7) and not right_sign("very_slow", 1.2) and not right_sign("fast", float("nan"))
    assert right_sign("low_pitch", -1.0) and right_sign("emphasis", 0.5) and not right_sign("emphasis", -0.5)
    table = instruction_table({"fast": [1.2, float("nan")], "emphasis": [1.0, -1.0]}, {"fast": [1.3], "emphasis": [2.0]})
    fast, emphasis = table.splitlines()[1:]
    assert fast.split()[:4] == ["fast", "speed", "factor", "x1.3"]
    assert "1.20        50% [ 9%,  91%] n=2" in fast and "1.30       100% [21%, 100%] n=1" in fast
    assert "0.00        50% [ 9%,  91%] n=2" in emphasis and "2.00       100% [21%, 100%] n=1" in emphasis
    quality = {"without instruction": {"WER": 0.5, "SIM (resemblyzer)": 0.8, "n": 1},
               "with instruction": {"WER": 0.25, "SIM (resemblyzer)": 0.7, "n": 7, "WER 95%": [0.1, 0.4], "SIM 95%": [0.6, 0.75]}}
    without, with_ = quality_table(quality).splitlines()[1:]
    assert without.split()[2:] == ["0.500", "0.800", "1"]
    assert with_.split()[2:] == ["0.250", "[0.100,", "0.400]", "0.700", "[0.600,", "0.750]", "7"]
    lo, hi = wilson_interval(8, 10)                          # the textbook value: 0.490-0.943
    assert abs(lo - 0.4902) < 1e-3 and abs(hi - 0.9433) < 1e-3
    assert wilson_interval(0, 5)[0] == pytest.approx(0.0, abs=1e-12) and wilson_interval(5, 5)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(3, 2)


def test_mel_median_f0_reads_the_voiced_frames_and_the_pitch_table():
    from types import SimpleNamespace

    from minicosy.eval_instruct import mel_median_f0, pitch_table

    class Reader(torch.nn.Module):              # stands in for HiFT: its F0 predictor and threshold
        def __init__(self, f0):
            super().__init__()
            self.f0, self.cfg, self.w = torch.tensor([f0]), SimpleNamespace(voiced_threshold=10.0), torch.nn.Parameter(torch.zeros(1))

        def predict_f0(self, mel):
            return self.f0

    assert mel_median_f0(Reader([0.0, 100.0, 5.0, 120.0, 140.0]), torch.zeros(1, 80, 5)) == 120.0
    with pytest.raises(ValueError, match="voiced"):
        mel_median_f0(Reader([0.0, 3.0]), torch.zeros(1, 80, 2))
    table = pitch_table({"high_pitch": {"recordings (pYIN)": [3.0, 2.0], "flow on the tokens": [-0.5, float("nan")]}})
    pyin, tokens = table.splitlines()[1:]
    assert pyin.split()[:4] == ["high_pitch", "recordings", "(pYIN)", "+2.50"] and "100% [34%, 100%] n=2" in pyin
    assert tokens.split()[5] == "-0.50" and "0% [ 0%,  66%] n=2" in tokens


def test_frame_rate_buzz_finds_a_beat_at_the_mel_frame_rate():
    from minicosy.eval_instruct import frame_rate_buzz

    sr, t = 24000, np.arange(3 * 24000) / 24000
    noise = np.random.default_rng(0).standard_normal(t.size)
    assert frame_rate_buzz(noise, sr) < 5
    assert frame_rate_buzz(noise * (1 + 0.5 * np.sin(2 * np.pi * 50 * t)), sr) > 20
    assert frame_rate_buzz(noise * (1 + 0.5 * np.sin(2 * np.pi * 37 * t)), sr) < 5     # another beat is not the frame rate
    with pytest.raises(ValueError, match="too short"):
        frame_rate_buzz(noise[:2400], sr)
