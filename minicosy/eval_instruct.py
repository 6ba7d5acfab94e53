"""Instruction following (§2.6, §4.5's MOS-I and Table 10), measured instead of rated: how far a
rendering moved from its neutral twin the way its instruction asks (speed factor, F0 shift in
semitones, the marked word's level gain), for the model and for the engines' own renderings, each
"right way" share with its binomial (Wilson) interval.

Usage (or ``python -m minicosy eval --instructions --n 16``)::

    result = evaluate_instructions(tts, "data/corpus", n=16)
    print(instruction_table(result["changes"], corpus_instruction_changes("data/corpus")))
    print(quality_table(result["quality"]))
    print(pitch_table(pitch_carriers(tts, "data/corpus", n=16)))
"""
from __future__ import annotations

from pathlib import Path
from statistics import NormalDist
from typing import Callable

import numpy as np
import torch

from .audio import resample
from .eval import (SpeakerEncoder, SphinxASR, bootstrap_interval, error_rate, flow_on_true_tokens, sentence_errors,
                   synthesis_trials, wer_of)
from .pipeline import join_speech


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``successes / n`` (sound at small ``n`` and at
    0 or ``n`` successes, where the normal approximation is not); (0, 1) for ``n == 0``."""
    if n == 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n={n}], got {successes}")
    z, p = NormalDist().inv_cdf(0.5 + level / 2), successes / n
    centre, half = p + z * z / (2 * n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return float((centre - half) / (1 + z * z / n)), float((centre + half) / (1 + z * z / n))


def _condition_change(condition: str, wav: np.ndarray, neutral: np.ndarray, sr: int, text: str = "",
                      word: str = "", f0_of: Callable[[np.ndarray, int], float] | None = None) -> float:
    """How far a rendering moved from its neutral twin the way ``condition`` asks: the speed factor
    (neutral speech duration / this one) for rate conditions, the median-F0 shift in semitones for
    pitch (by ``f0_of(wav, sr)``, default pYIN's :func:`~minicosy.instruct.median_f0`), and for
    emphasis the gain in the marked word's level over the rest (dB, against the same window in the
    neutral rendering). NaN where either rendering cannot be measured."""
    from .instruct import CONDITIONS, emphasis_contrast, median_f0, semitones, speech_duration, speech_span, word_window

    f0_of = f0_of or median_f0
    cond = CONDITIONS[condition]
    try:
        if cond.emphasis:
            gain = [emphasis_contrast(w, sr, word_window(text, word, speech_span(w, sr)))["level_db"] for w in (wav, neutral)]
            return gain[0] - gain[1]
        if cond.semitones:
            return semitones(f0_of(wav, sr), f0_of(neutral, sr))
        return speech_duration(neutral, sr) / speech_duration(wav, sr)
    except ValueError:          # silent, unvoiced or too short to measure: counts as not following
        return float("nan")


def right_sign(condition: str, change: float) -> bool:
    """Whether a measured change goes the way the condition asks (never for NaN)."""
    from .instruct import CONDITIONS

    cond = CONDITIONS[condition]
    if not np.isfinite(change):
        return False
    if cond.emphasis:
        return change > 0
    if cond.semitones:
        return bool(np.sign(change) == np.sign(cond.semitones))
    return bool(np.sign(change - 1) == np.sign(cond.rate - 1))


def corpus_instruction_changes(corpus_root: str | Path = "data/corpus", per_condition: int = 12) -> dict[str, list[float]]:
    """:func:`_condition_change` of the instruct sub-corpus' own renderings against their neutral
    twins (the first ``per_condition`` of each condition): what the training data shows the model."""
    from .audio import load_wav
    from .data import INSTRUCT_DIR, load_manifest

    root = Path(corpus_root) / INSTRUCT_DIR
    records = load_manifest(root)
    by_id = {r["id"]: r for r in records}
    out: dict[str, list[float]] = {}
    for r in records:
        if r["condition"] == "neutral" or len(out.get(r["condition"], [])) >= per_condition:
            continue
        wav, sr = load_wav(root / r["path"])
        neutral, _ = load_wav(root / by_id[r["neutral_id"]]["path"], sr)
        out.setdefault(r["condition"], []).append(
            _condition_change(r["condition"], wav, neutral, sr, r["text"], r["emphasis_word"]))
    return out


def evaluate_instructions(tts, corpus_root: str | Path = "data/corpus", n: int = 4, seed: int = 0,
                          conditions: tuple[str, ...] = ("very_slow", "slow", "fast", "very_fast", "high_pitch",
                                                         "low_pitch", "emphasis"),
                          progress: bool = True) -> dict:
    """The objective instruction score: on :func:`synthesis_trials` (held-out English sentences,
    held-out voices), synthesise each sentence without an instruction (``inference_cross_lingual``:
    no LM prompt, the prompt voice in the flow), with each instruction's first English template
    (``inference_instruct2``) and with one ``<strong>`` word; measure each against the neutral
    synthesis (:func:`_condition_change`) and the content/voice cost (WER, resemblyzer SIM). Pitch
    is read off the output's mel by ``tts.hift``'s F0 predictor (:func:`mel_median_f0`): pYIN takes
    the tiny vocoders' 50 Hz buzz (:func:`frame_rate_buzz`) for the pitch.

    Returns ``changes`` (per condition, per trial), ``quality`` (without / with instruction), and
    ``audio`` (the first trial's waveforms, for listening)."""
    import random

    from tqdm.auto import tqdm

    from .audio import load_wav, mel_spectrogram
    from .instruct import instruction, mark_word

    root, sr = Path(corpus_root), tts.sample_rate

    def f0_of(wav: np.ndarray, rate: int) -> float:
        return mel_median_f0(tts.hift, mel_spectrogram(resample(wav, rate, 24000))[None])

    asr, judge = SphinxASR(), SpeakerEncoder()
    changes: dict[str, list[float]] = {c: [] for c in conditions}
    quality = {k: {"ref": [], "hyp": [], "sim": []} for k in ("without instruction", "with instruction")}
    audio: dict[str, np.ndarray] = {}
    first_text = ""
    for k, trial in enumerate(tqdm(synthesis_trials(root, n), desc="instruction evaluation", disable=not progress)):
        target, prompt_rec = trial["target"], trial["prompt"]
        prompt = load_wav(root / prompt_rec["path"])
        text = target["text"]

        def say(instruct: str = "", spoken: str = text) -> np.ndarray:
            run = (tts.inference_instruct2(spoken, instruct, prompt, seed=seed) if instruct else
                   tts.inference_cross_lingual(spoken, prompt, seed=seed))
            return join_speech(run)[0].numpy()

        neutral = say()
        outputs = {"neutral": neutral}
        for cond in conditions:
            tagged, word = mark_word(text, random.Random(seed + k)) if cond == "emphasis" else (text, "")
            wav = say(instruction(cond, "en"), tagged)
            outputs[cond] = wav
            changes[cond].append(_condition_change(cond, wav, neutral, sr, tagged, word, f0_of))
        for cond, wav in outputs.items():
            row = quality["without instruction" if cond == "neutral" else "with instruction"]
            row["ref"].append(text)
            row["hyp"].append(asr.transcribe(wav, sr))
            row["sim"].append(judge.similarity(wav, sr, *prompt))
        if k == 0:
            audio, first_text = outputs, text
    return {"changes": changes, "audio": audio, "text": first_text,
            "quality": {k: _quality(v["ref"], v["hyp"], v["sim"]) for k, v in quality.items()}}


def _quality(refs: list[str], hyps: list[str], sims: list[float]) -> dict:
    """WER and mean resemblyzer similarity of a set of renderings, each with a bootstrap 95 % interval
    over renderings where there are two or more (what instructions cost)."""
    out = {"WER": error_rate(refs, hyps, "en"), "SIM (resemblyzer)": float(np.mean(sims)), "n": len(refs)}
    if len(refs) > 1:
        errors, words = sentence_errors(refs, hyps, "en")
        out.update({"WER 95%": bootstrap_interval(wer_of, errors, words),
                    "SIM 95%": bootstrap_interval(np.mean, np.asarray(sims))})
    return out


def right_way_share(condition: str, changes: list[float]) -> str:
    """The share of ``changes`` that went the way ``condition`` asks, with its Wilson 95 % interval
    and the trial count (NaN trials count as not following)."""
    k, n = sum(right_sign(condition, v) for v in changes), len(changes)
    lo, hi = wilson_interval(k, n)
    return f"{k / max(n, 1):4.0%} [{lo:3.0%}, {hi:4.0%}] n={n}"


def instruction_table(model: dict[str, list[float]], corpus: dict[str, list[float]] | None = None) -> str:
    """Per condition: what is measured, the mean change over the measurable trials and the share of
    all trials that moved the right way (:func:`right_way_share`), for the model (and the engines'
    own renderings, ``corpus``)."""
    from .instruct import CONDITIONS

    unit = {c: ("level gain dB" if CONDITIONS[c].emphasis else "pitch shift st" if CONDITIONS[c].semitones
                else "speed factor") for c in model}
    head = f"{'instruction':12s} {'measure':15s} {'asked':>7s} {'model':>8s} {'right way (95%, trials)':>26s}"
    lines = [head + (f" {'corpus':>8s} {'right way (95%, trials)':>26s}" if corpus else "")]
    for c, values in model.items():
        cond = CONDITIONS[c]
        asked = "louder" if cond.emphasis else f"{cond.semitones:+.0f} st" if cond.semitones else f"x{cond.rate:g}"
        line = (f"{c:12s} {unit[c]:15s} {asked:>7s} {np.nanmean(values) if np.isfinite(values).any() else np.nan:8.2f} "
                f"{right_way_share(c, values):>26s}")
        if corpus:
            line += f" {np.nanmean(corpus[c]):8.2f} {right_way_share(c, corpus[c]):>26s}"
        lines.append(line)
    return "\n".join(lines)


def quality_table(quality: dict[str, dict]) -> str:
    """What instructions cost (:func:`evaluate_instructions`' ``quality``): WER and resemblyzer
    similarity without and with an instruction, each with its bootstrap 95 % interval where there is one."""
    def cell(q: dict, key: str) -> str:
        value = f"{q[key if key == 'WER' else 'SIM (resemblyzer)']:.3f}"
        return value + (" [{:.3f}, {:.3f}]".format(*q[f"{key} 95%"]) if f"{key} 95%" in q else "")

    lines = [f"{'':20s} {'WER (95%)':>22s} {'SIM (95%)':>22s} {'n':>4s}"]
    lines += [f"{row:20s} {cell(q, 'WER'):>22s} {cell(q, 'SIM'):>22s} {q['n']:4d}" for row, q in quality.items()]
    return "\n".join(lines)


def frame_rate_buzz(wav: np.ndarray, sr: int, frame_rate: float = 50.0, above_hz: float = 2000.0) -> float:
    """How strongly a waveform's loudness beats at the mel frame rate (50 Hz; HiFT's input rate):
    the envelope of its content above ``above_hz``, at 1 kHz, then the peak of that envelope's
    spectrum within 1 Hz of ``frame_rate`` over its median between 0.6 and 1.4 × ``frame_rate``.
    Speech gives a few units; a vocoder whose up-sampling leaves a pattern repeating every mel
    frame gives tens, and pYIN then takes the frame period (20 ms, its 50 Hz floor) for the pitch."""
    x = np.asarray(wav, dtype=np.float64).reshape(-1)
    block = max(1, round(sr / 1000))
    if x.size < 8 * sr / frame_rate:                     # eight beats at least
        raise ValueError(f"{x.size / sr:.2f} s is too short to measure a {frame_rate:g} Hz beat")
    spec = np.fft.rfft(x)
    spec[np.fft.rfftfreq(x.size, 1 / sr) < above_hz] = 0
    env = np.abs(np.fft.irfft(spec, x.size))
    env = env[: env.size // block * block].reshape(-1, block).mean(1)
    mag = np.abs(np.fft.rfft(env - env.mean()))
    freqs = np.fft.rfftfreq(env.size, block / sr)
    near = np.abs(freqs - frame_rate)
    return float(mag[near <= 1.0].max() / np.median(mag[near <= 0.4 * frame_rate]))


@torch.no_grad()
def mel_median_f0(hift, mel: torch.Tensor) -> float:
    """Median F0 (Hz) that HiFT's F0 predictor reads off a mel (1, 80, T), over its voiced frames;
    ``ValueError`` if none is voiced. It measures the flow's output before any vocoder sound."""
    f0 = hift.predict_f0(mel.to(next(hift.parameters()).device))[0].float().cpu().numpy()
    voiced = f0[f0 > hift.cfg.voiced_threshold]
    if not voiced.size:
        raise ValueError("no voiced frames: cannot measure pitch")
    return float(np.median(voiced))


# what a pitch instruction could reach: the speech tokens, or the flow's conditioning (§2.2, §2.4)
PITCH_CARRIERS = ("recordings (pYIN)", "recordings (F0 predictor)", "flow on the tokens", "flow prompted in the condition")


@torch.no_grad()
def pitch_carriers(tts, corpus_root: str | Path = "data/corpus", n: int = 8,
                   conditions: tuple[str, ...] = ("high_pitch", "low_pitch"), seed: int = 0,
                   progress: bool = True) -> dict[str, dict[str, list[float]]]:
    """Where the pitch of a rendering lives, on ``n`` English renderings per pitch condition of the
    instruct sub-corpus (seeded draw), each against its neutral twin: median-F0 shifts in semitones.

    * ``recordings (pYIN)``: the rendering against its twin (what the training data asks for);
    * ``recordings (F0 predictor)``: the same, read off the two mels by HiFT's F0 predictor, the
      instrument of the next two rows (they measure mels, before the vocoder adds its own sound);
    * ``flow on the tokens``: the flow's mel from the rendering's speech tokens against the one
      from its twin's, both prompted by a neutral rendering of another sentence by the same voice:
      what the ASR-supervised tokens (§2.2) carry to the flow, hence all an LM could change;
    * ``flow prompted in the condition``: the flow on the twin's tokens prompted by that other
      sentence rendered in the condition, against the neutral prompt: what the flow's conditioning
      (x-vector and prompt mel, §2.4) carries, where a pitch instruction would have to arrive.

    A rendering is a trial only if its voice has read another sentence in the same condition. A
    shift that cannot be measured (nothing voiced) is NaN."""
    import random

    from tqdm.auto import tqdm

    from .audio import load_wav, mel_spectrogram
    from .data import INSTRUCT_DIR, load_manifest
    from .instruct import median_f0, semitones

    root, sr = Path(corpus_root) / INSTRUCT_DIR, tts.sample_rate
    records = [r for r in load_manifest(root) if r["lang"] == "en"]
    by_id = {r["id"]: r for r in records}

    def shift(measure, a, b) -> float:
        try:
            return semitones(measure(a), measure(b))
        except ValueError:
            return float("nan")

    def on_mel(mel: torch.Tensor) -> float:
        return mel_median_f0(tts.hift, mel)

    out: dict[str, dict[str, list[float]]] = {}
    for cond in conditions:
        rows = sorted((r for r in records if r["condition"] == cond and r["neutral_id"] in by_id), key=lambda r: r["id"])
        trials = []
        for r in rows:
            other = next((o for o in rows if o["speaker"] == r["speaker"] and o["neutral_id"] != r["neutral_id"]), None)
            if other is not None:
                trials.append((r, other))
        if not trials:
            raise ValueError(f"no {cond} rendering under {root} has another sentence of its voice in the same "
                             "condition to prompt the flow with")
        shifts: dict[str, list[float]] = {m: [] for m in PITCH_CARRIERS}
        for r, other in tqdm(random.Random(seed).sample(trials, min(n, len(trials))), desc=f"{cond} carriers",
                             disable=not progress):
            wav, twin = (load_wav(root / rec["path"], sr)[0] for rec in (r, by_id[r["neutral_id"]]))
            neutral_prompt, cond_prompt = (tts.frontend.prompt(str(root / rec["path"]), rec["text"])
                                           for rec in (by_id[other["neutral_id"]], other))
            base = flow_on_true_tokens(tts, twin, neutral_prompt)
            shifts["recordings (pYIN)"].append(shift(lambda w: median_f0(w, sr), wav, twin))
            shifts["recordings (F0 predictor)"].append(shift(on_mel, *(mel_spectrogram(w)[None] for w in (wav, twin))))
            shifts["flow on the tokens"].append(shift(on_mel, flow_on_true_tokens(tts, wav, neutral_prompt), base))
            shifts["flow prompted in the condition"].append(shift(on_mel, flow_on_true_tokens(tts, twin, cond_prompt), base))
        out[cond] = shifts
    return out


def pitch_table(carriers: dict[str, dict[str, list[float]]]) -> str:
    """:func:`pitch_carriers` as a table: per condition and carrier, the mean F0 shift (semitones)
    with its bootstrap 95 % interval and the share of trials that moved the right way."""
    lines = [f"{'condition':11s} {'carrier':31s} {'shift st (95%)':>22s} {'right way (95%, trials)':>26s}"]
    for cond, shifts in carriers.items():
        for carrier, values in shifts.items():
            v = np.asarray(values, dtype=float)
            v = v[np.isfinite(v)]
            cell = (f"{v.mean():+.2f} [{'{:+.2f}, {:+.2f}'.format(*bootstrap_interval(np.mean, v))}]" if v.size > 1
                    else f"{v.mean():+.2f}" if v.size else "n/a")
            lines.append(f"{cond:11s} {carrier:31s} {cell:>22s} {right_way_share(cond, values):>26s}")
    return "\n".join(lines)
