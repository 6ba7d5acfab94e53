"""Evaluators: text normalisation for WER, an independent ASR and speaker model on real speech."""
import csv
from collections import defaultdict

import numpy as np
import pytest

from minicosy.audio import load_wav
from minicosy.eval import (SpeakerEncoder, SphinxASR, bootstrap_interval, compare_voice_results, equal_error_rate,
                           error_rate, normalize_for_wer, sentence_errors, trial_scores, wer_of)

from .conftest import SHARED_DATA, need


def test_normalize_for_wer():
    assert normalize_for_wer("Dr. Smith's 3 cats -- well-fed!", "en") == "dr smith's three cats well fed"
    assert normalize_for_wer("  'Quoted' words.", "en") == "quoted words"
    assert normalize_for_wer("我买了2个苹果，好吗？", "zh") == "我买了两个苹果好吗"
    assert normalize_for_wer("今日は、晴れ。", "ja") == "今日は晴れ"
    assert normalize_for_wer("안녕 하세요.", "ko") == "안녕하세요"
    with pytest.raises(ValueError, match="unsupported language"):
        normalize_for_wer("x", "fr")
    with pytest.raises(ValueError, match="expected a string"):
        normalize_for_wer(None, "en")


def test_error_rate_by_hand():
    # 1 substitution + 1 deletion over 6 reference words
    assert error_rate(["the cat sat on the mat"], ["the cat sit on mat"], "en") == pytest.approx(2 / 6)
    assert error_rate(["It costs $5."], ["it costs five dollars"], "en") == 0.0
    # CER: 1 substitution over 4 characters
    assert error_rate(["你好世界"], ["你好视界"], "zh") == pytest.approx(0.25)
    with pytest.raises(ValueError):
        error_rate(["a"], [], "en")


def test_sentence_errors_add_up_to_the_corpus_error_rate():
    refs, hyps = ["the cat sat on the mat", "a dog", "It costs $5."], ["the cat sit on mat", "a big dog", "it costs"]
    errors, words = sentence_errors(refs, hyps, "en")
    assert errors.tolist() == [2, 1, 2] and words.tolist() == [6, 2, 4]
    assert wer_of(errors, words) == pytest.approx(error_rate(refs, hyps, "en"))
    errors, words = sentence_errors(["你好世界"], ["你好视界"], "zh")
    assert (errors.tolist(), words.tolist()) == ([1], [4])


def test_bootstrap_interval_covers_the_estimate_narrows_with_data_and_keeps_pairs():
    rng = np.random.default_rng(1)
    words = rng.integers(5, 15, 400).astype(float)
    errors = rng.binomial(words.astype(int), 0.3).astype(float)
    lo, hi = bootstrap_interval(wer_of, errors[:20], words[:20])
    lo_big, hi_big = bootstrap_interval(wer_of, errors, words)
    assert lo <= wer_of(errors[:20], words[:20]) <= hi and lo_big <= wer_of(errors, words) <= hi_big
    assert hi_big - lo_big < (hi - lo) / 2 and lo_big < 0.3 < hi_big
    assert bootstrap_interval(wer_of, errors, words) == (lo_big, hi_big)                  # seeded
    diff = lambda a, b, w: wer_of(a, w) - wer_of(b, w)                                # noqa: E731
    assert bootstrap_interval(diff, errors + 1, errors, words)[0] > 0                     # paired: one more error each
    with pytest.raises(ValueError, match="one length"):
        bootstrap_interval(wer_of, errors, words[:3])


def _voice_result(refs: list[str], hyps: list[str], cam: float = 0.5) -> dict:
    sims = [[0.6] * len(refs), [cam + i / 100 for i in range(len(refs))]]        # resemblyzer, CAM++
    return {"modes": ["offline"], "voices": {"v": {"refs": refs, "hyps": {"offline": hyps}, "sims": {"offline": sims}}},
            "pooled": {"readable": {"voices": ["v"]}}}


def test_compare_voice_results_pairs_the_sentences():
    refs = [f"sentence number {w} is here" for w in ("one", "two", "three", "four", "five", "six", "seven", "eight")]
    a = _voice_result(refs, refs)
    same = compare_voice_results(a, a)["offline"]
    assert same["B - A"] == 0 and same["95%"] == (0.0, 0.0) and same["SIM CAM++"]["95%"] == (0.0, 0.0)
    closer = compare_voice_results(a, _voice_result(refs, refs, cam=0.6))["offline"]["SIM CAM++"]
    assert closer["B - A"] == pytest.approx(0.1) and closer["95%"] == pytest.approx((0.1, 0.1))
    assert closer["A"] == pytest.approx(0.535) and compare_voice_results(a, a)["offline"]["SIM resemblyzer"]["A"] == 0.6
    worse = compare_voice_results(a, _voice_result(refs, [r.replace("is", "was") for r in refs]))["offline"]
    assert worse["WER A"] == 0 and worse["B - A"] == pytest.approx(0.2) and worse["95%"][0] > 0
    with pytest.raises(ValueError, match="same voices and sentences"):
        compare_voice_results(a, _voice_result(refs[::-1], refs[::-1]))


def test_equal_error_rate_by_hand():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.4, 0.3])
    assert equal_error_rate(scores, np.array([1, 1, 1, 0, 0, 0]))[0] == 0.0
    eer, _ = equal_error_rate(scores, np.array([1, 1, 0, 1, 0, 0]))
    assert eer == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="both"):
        equal_error_rate(scores, np.ones(6))


def test_pocketsphinx_wer_on_ljspeech():
    folder = need(SHARED_DATA / "ljspeech_lj001", "LJSpeech clips")
    with open(folder / "metadata.csv", encoding="utf-8") as f:
        meta = dict(row[:2] for row in csv.reader(f, delimiter="|"))
    ids = sorted(meta)[:8]
    asr = SphinxASR()
    hyps = [asr.transcribe(*load_wav(folder / f"{i}.flac")) for i in ids]
    wer = error_rate([meta[i] for i in ids], hyps, "en")
    print(f"\npocketsphinx WER on {len(ids)} LJSpeech clips: {wer:.3f}")
    assert np.isfinite(wer) and wer < 0.6
    assert asr.transcribe(np.zeros(0, np.float32), 24000) == ""              # an LM that said nothing


def test_pocketsphinx_utterances_are_independent():
    """A transcript must not depend on what the same recogniser heard before (the decoder's
    cepstral-mean and feature state is reset per utterance)."""
    folder = need(SHARED_DATA / "fsdd", "FSDD digits")
    clips = [load_wav(folder / f"0_george_{i}.flac") for i in (0, 1, 10, 11)]
    noise = np.random.default_rng(0).normal(0.0, 0.3, 3 * 16000).astype(np.float32)
    fresh = [SphinxASR().transcribe(*clip) for clip in clips]
    asr = SphinxASR()
    in_order = [asr.transcribe(*clip) for clip in clips]
    after_noise = []
    for clip in reversed(clips):
        asr.transcribe(noise, 16000)
        after_noise.append(asr.transcribe(*clip))
    assert in_order == fresh and after_noise[::-1] == fresh


def test_resemblyzer_separates_librispeech_speakers():
    folder = need(SHARED_DATA / "librispeech_test-other", "LibriSpeech speakers")
    enc = SpeakerEncoder()
    embeddings, speakers = [], []
    for spk_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for path in sorted(spk_dir.glob("*.flac"))[:3]:
            embeddings.append(enc.embed(*load_wav(path)))
            speakers.append(spk_dir.name)
    scores, labels = trial_scores(np.stack(embeddings), speakers)
    same, diff = scores[labels == 1].mean(), scores[labels == 0].mean()
    eer, _ = equal_error_rate(scores, labels)
    print(f"\nresemblyzer: same-speaker cosine {same:.3f}, different {diff:.3f}, EER {eer:.3f}")
    assert same > diff + 0.15
    wav, sr = load_wav(sorted(folder.glob("*/*.flac"))[0])
    assert enc.similarity(np.zeros(0, np.float32), 24000, wav, sr) == 0.0    # silence resembles no one
    per_speaker = defaultdict(list)
    for s, e in zip(speakers, embeddings):
        per_speaker[s].append(e)
    assert len(per_speaker) == 10
