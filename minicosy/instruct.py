"""Instructed generation at small scale (§2.6, §4.5): instructions a program can render and measure.

The paper teaches instruction following with 1,500 hours of labelled speech. Here the engines'
own controls render the same sentence under a *known* condition -- speaking rate (the paper's
very slow / slow / fast / very fast classes), high or low pitch, and emphasis on a marked word
(``<strong>…</strong>``, the paper's fine-grained tag) -- each paired with a natural-language
instruction in English or Mandarin ending in ``<|endofprompt|>``. The measuring functions below
then read the rate, pitch and emphasis back from any audio, which gives an objective analogue of
the paper's MOS-I.

Usage::

    python -m minicosy.data build          # also renders data/corpus/instruct (~20 min of audio)

    from minicosy.instruct import CONDITIONS, speech_duration, median_f0
    CONDITIONS["very_fast"].rate           # 1.6: the engine speaks 1.6x faster than neutral
"""
from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass

import librosa
import numpy as np

from .engines import Voice

END_OF_PROMPT = "<|endofprompt|>"


@dataclass(frozen=True)
class Condition:
    """One rendered condition: speed factor (>1 faster), pitch shift in semitones, emphasis."""

    name: str
    rate: float = 1.0
    semitones: float = 0.0
    emphasis: bool = False


CONDITIONS: dict[str, Condition] = {c.name: c for c in [
    Condition("neutral"),
    Condition("very_slow", rate=0.6), Condition("slow", rate=0.8),
    Condition("fast", rate=1.3), Condition("very_fast", rate=1.6),
    Condition("high_pitch", semitones=5.0), Condition("low_pitch", semitones=-5.0),
    Condition("emphasis", emphasis=True),
]}

# Natural-language instructions per condition, a few paraphrases each in English and Mandarin.
# Emphasis needs none: the ``<strong>`` tags in the text are the instruction (Table 1).
TEMPLATES: dict[str, dict[str, list[str]]] = {
    "very_slow": {"en": ["Please speak very slowly.", "Say this very slowly.", "Speak at a very slow pace."],
                  "zh": ["请用非常慢的语速说这句话。", "请非常缓慢地说。"]},
    "slow": {"en": ["Please speak slowly.", "Speak a little slower.", "Say it slowly."],
             "zh": ["请用慢速说这句话。", "请说得慢一点。"]},
    "fast": {"en": ["Please speak fast.", "Speak a bit faster.", "Say it quickly."],
             "zh": ["请用快速说这句话。", "请说得快一点。"]},
    "very_fast": {"en": ["Please speak very fast.", "Say this as fast as you can.", "Speak at a very fast pace."],
                  "zh": ["请用非常快的语速说这句话。", "请以极快的速度说。"]},
    "high_pitch": {"en": ["Please speak in a high voice.", "Use a higher pitch.", "Speak with a high tone."],
                   "zh": ["请用高音调说话。", "请提高音调。"]},
    "low_pitch": {"en": ["Please speak in a low voice.", "Use a deep, low pitch.", "Speak with a low tone."],
                  "zh": ["请用低沉的声音说话。", "请降低音调。"]},
}


def instruction(condition: str, lang: str = "en", k: int = 0) -> str:
    """The ``k``-th template of ``condition`` in ``lang``, with ``<|endofprompt|>``; '' for neutral
    and emphasis (no instruction text)."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; choose one of {sorted(CONDITIONS)}")
    options = TEMPLATES.get(condition, {}).get(lang)
    if condition in TEMPLATES and not options:
        raise ValueError(f"no {lang!r} templates for {condition!r}; languages: {sorted(TEMPLATES[condition])}")
    return options[k % len(options)] + END_OF_PROMPT if options else ""


def render_voice(voice: Voice, condition: Condition) -> Voice | None:
    """``voice`` with its engine parameters changed to render ``condition``, or ``None`` when the
    engine has no control for it (see :func:`unsupported`)."""
    if unsupported(voice, condition):
        return None
    p, rate = dict(voice.params), condition.rate
    if voice.engine == "espeak":
        p["speed"] = round(p["speed"] * rate)
        if condition.semitones:
            p["prosody_pitch"] = f"{100 * (2 ** (condition.semitones / 12) - 1):+.0f}%"
    elif voice.engine == "flite":
        p["duration_stretch"] = round(1 / rate, 3)
    elif voice.engine == "piper":
        p["length_scale"] = round(p["length_scale"] / rate, 3)
    elif voice.engine == "hibari":
        p["speed"] = p["speed"] * rate
    elif voice.engine == "openjtalk":
        p["speed"], p["half_tone"] = p["speed"] * rate, p["half_tone"] + condition.semitones
    return dataclasses.replace(voice, params=p)


def unsupported(voice: Voice, condition: Condition) -> str:
    """Why ``voice``'s engine cannot render ``condition`` ('' when it can)."""
    if condition.semitones and voice.engine == "flite":
        return "flite sets an absolute F0 target per voice (int_f0_target_mean), not a relative shift"
    if condition.semitones and voice.engine in ("piper", "hibari"):
        return f"{voice.engine} has no pitch control"
    if condition.emphasis and voice.engine == "espeak" and voice.lang != "en":
        return "espeak reads Mandarin as tone-numbered pinyin, which loses the word marks"
    if condition.emphasis and voice.engine != "espeak":
        return f"{voice.engine} has no emphasis markup"
    return ""


def mark_word(text: str, rng: random.Random) -> tuple[str, str]:
    """Wrap one content word (≥ 4 letters) of an English sentence in ``<strong>…</strong>``."""
    words = [m for m in re.finditer(r"[A-Za-z']{4,}", text)]
    if not words:
        raise ValueError(f"no word of four letters or more to emphasise in {text!r}")
    m = rng.choice(words)
    return text[:m.start()] + "<strong>" + m.group() + "</strong>" + text[m.end():], m.group()


# ----- measuring (the instruction score, §4.5) ------------------------------------------------
def speech_span(wav: np.ndarray, sr: int, top_db: float = 35.0) -> tuple[float, float]:
    """Start and end (seconds) of the speech, leading and trailing silence excluded."""
    wav = np.asarray(wav, dtype=np.float32).reshape(-1)
    if wav.size == 0 or float(np.abs(wav).max()) < 1e-5:
        raise ValueError("cannot measure silent or empty audio")
    _, (start, end) = librosa.effects.trim(wav, top_db=top_db, frame_length=512, hop_length=128)
    return start / sr, end / sr


def speech_duration(wav: np.ndarray, sr: int) -> float:
    """Seconds of speech between the first and the last non-silent frame."""
    start, end = speech_span(wav, sr)
    return end - start


def f0_track(wav: np.ndarray, sr: int, fmin: float = 50.0, fmax: float = 600.0) -> tuple[np.ndarray, np.ndarray]:
    """pYIN F0 (Hz, NaN where unvoiced) at 16 kHz and its frame times (s); pitch bins of a quarter
    semitone (pYIN's default tenth costs 6x the time for no change a median can show)."""
    y = librosa.resample(np.asarray(wav, dtype=np.float32).reshape(-1), orig_sr=sr, target_sr=16000) if sr != 16000 else wav
    f0, _, _ = librosa.pyin(np.asarray(y, dtype=np.float64), fmin=fmin, fmax=fmax, sr=16000, frame_length=1024,
                            hop_length=160, resolution=0.25)
    return f0, librosa.frames_to_time(np.arange(len(f0)), sr=16000, hop_length=160)


def median_f0(wav: np.ndarray, sr: int) -> float:
    """Median F0 (Hz) of the voiced frames; ``ValueError`` if nothing is voiced."""
    f0, _ = f0_track(wav, sr)
    if not np.isfinite(f0).any():
        raise ValueError("no voiced frames: cannot measure pitch")
    return float(np.nanmedian(f0))


def semitones(f_hz: float, ref_hz: float) -> float:
    """Pitch difference in semitones, 12·log2(f / ref)."""
    return float(12 * np.log2(f_hz / ref_hz))


def word_window(text: str, word: str, span: tuple[float, float]) -> tuple[float, float]:
    """Where a word probably is (seconds): its letters' share of the text mapped linearly onto the
    speech span (no aligner; good enough to compare two renderings of the same text)."""
    plain = re.sub(r"</?strong>", "", text)
    at = plain.find(word)
    if not word or at < 0:
        raise ValueError(f"word {word!r} not in {plain!r}")
    letters = [i for i, ch in enumerate(plain) if ch.isalnum()]
    before = sum(1 for i in letters if i < at)
    inside = sum(1 for i in letters if at <= i < at + len(word))
    start, end = span
    return start + (end - start) * before / len(letters), start + (end - start) * (before + inside) / len(letters)


def emphasis_contrast(wav: np.ndarray, sr: int, window: tuple[float, float]) -> dict[str, float]:
    """Level (dB RMS) and median F0 (semitones) of ``window`` against the rest of the speech."""
    wav = np.asarray(wav, dtype=np.float32).reshape(-1)
    span = speech_span(wav, sr)
    a, b = (int(t * sr) for t in window)
    rest = np.concatenate([wav[int(span[0] * sr):a], wav[b:int(span[1] * sr)]])
    if b - a < sr // 50 or rest.size < sr // 50:
        raise ValueError(f"window {window} leaves too little audio to compare")

    def db(x: np.ndarray) -> float:
        return float(10 * np.log10(np.mean(x.astype(np.float64) ** 2) + 1e-12))

    f0, t = f0_track(wav, sr)
    inside = (t >= window[0]) & (t < window[1])
    outside = (t >= span[0]) & (t < span[1]) & ~inside
    fi, fo = f0[inside], f0[outside]
    pitch = (semitones(np.nanmedian(fi), np.nanmedian(fo))
             if np.isfinite(fi).any() and np.isfinite(fo).any() else float("nan"))
    return {"level_db": db(wav[a:b]) - db(rest), "pitch_st": pitch}
