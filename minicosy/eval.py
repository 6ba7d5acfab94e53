"""Objective evaluation with independent models (§3.3 in spirit): WER/CER, ASR, speaker similarity.

* :func:`error_rate` -- WER (English) or CER (Mandarin, Japanese, Korean) with jiwer, after the
  explicit normalisation of :func:`minicosy.textnorm.normalize_for_wer` (case, punctuation,
  numbers to words).
* :class:`SphinxASR` -- PyPI ``pocketsphinx``, an English recogniser that ships its acoustic and
  language model: independent of anything minicosy trains.
* :class:`SpeakerEncoder` -- PyPI ``resemblyzer``'s d-vector (ships its weights), for speaker
  similarity as cosine between embeddings.
* :func:`equal_error_rate` -- EER of verification scores.

Usage::

    asr = SphinxASR()
    hyp = asr.transcribe(wav, sr)
    error_rate(["In being comparatively modern."], [hyp], "en")
    sim = SpeakerEncoder().similarity(wav_a, sr_a, wav_b, sr_b)
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .audio import resample
from .pipeline import join_speech
from .textnorm import CHAR_LANGS, normalize_for_wer, normalize_text


def _normalised(references: list[str], hypotheses: list[str], lang: str) -> tuple[list[str], list[str]]:
    """References and hypotheses after :func:`normalize_for_wer`, checked: as many of each, none
    empty, no reference empty after normalisation."""
    if len(references) != len(hypotheses) or not references:
        raise ValueError("need the same, non-zero number of references and hypotheses")
    refs = [normalize_for_wer(r, lang) for r in references]
    if any(not r for r in refs):
        raise ValueError("a reference is empty after normalisation")
    return refs, [normalize_for_wer(h, lang) for h in hypotheses]


def error_rate(references: list[str], hypotheses: list[str], lang: str) -> float:
    """Corpus-level WER for English, CER for zh/ja/ko (as in the paper's tables)."""
    import jiwer

    refs, hyps = _normalised(references, hypotheses, lang)
    return float((jiwer.cer if lang in CHAR_LANGS else jiwer.wer)(refs, hyps))


def sentence_errors(references: list[str], hypotheses: list[str], lang: str) -> tuple[np.ndarray, np.ndarray]:
    """Per sentence: edit errors (S + D + I) and reference length, in words (or characters for
    zh/ja/ko); ``errors.sum() / length.sum()`` is :func:`error_rate`."""
    import jiwer

    measure = jiwer.process_characters if lang in CHAR_LANGS else jiwer.process_words
    out = [measure(r, h) for r, h in zip(*_normalised(references, hypotheses, lang))]
    errors = np.array([o.substitutions + o.deletions + o.insertions for o in out], dtype=float)
    return errors, np.array([o.hits + o.substitutions + o.deletions for o in out], dtype=float)


def bootstrap_interval(statistic, *columns: np.ndarray, n: int = 2000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(*columns)`` over sentences: the rows of all
    ``columns`` are resampled together (paired), so a ratio or a difference of two systems on the
    same sentences keeps its pairing. Seeded: the same data give the same interval."""
    rows = len(columns[0])
    if rows < 2 or any(len(c) != rows for c in columns):
        raise ValueError(f"need at least 2 sentences and columns of one length, got {[len(c) for c in columns]}")
    pick = np.random.default_rng(seed).integers(0, rows, size=(n, rows))
    values = np.array([statistic(*(c[i] for c in columns)) for i in pick])
    return tuple(float(v) for v in np.quantile(values, [(1 - level) / 2, (1 + level) / 2]))


def wer_of(errors: np.ndarray, words: np.ndarray) -> float:
    """Corpus WER from :func:`sentence_errors`."""
    return float(errors.sum() / max(words.sum(), 1))


def wer_difference(errors_b: np.ndarray, errors_a: np.ndarray, words: np.ndarray) -> float:
    """WER of B minus WER of A on the same sentences (a :func:`bootstrap_interval` statistic)."""
    return wer_of(errors_b, words) - wer_of(errors_a, words)


class SphinxASR:
    """English speech recognition with pocketsphinx's bundled US-English models (16 kHz).

    Each utterance is decoded as if by a fresh decoder: pocketsphinx carries its cepstral mean and
    feature buffers from one utterance to the next, which made a recording's transcript depend on
    what had been decoded before it."""

    sample_rate = 16000

    def __init__(self) -> None:
        from pocketsphinx import Decoder

        self.decoder = Decoder(samprate=self.sample_rate, loglevel="FATAL")
        self._initial_cmn = self.decoder.get_cmn()

    def transcribe(self, wav: np.ndarray, sr: int) -> str:
        """Lower-case transcript of one mono float waveform ("" for an empty one, e.g. when an LM
        stopped before its first speech token)."""
        if np.asarray(wav).size == 0:
            return ""
        wav = resample(np.asarray(wav, dtype=np.float32), sr, self.sample_rate)
        pcm = (np.clip(wav, -1.0, 1.0) * 32767).astype(np.int16).tobytes()
        self.decoder.reinit_feat()
        self.decoder.set_cmn(self._initial_cmn)
        self.decoder.start_utt()
        self.decoder.process_raw(pcm, full_utt=True)
        self.decoder.end_utt()
        hyp = self.decoder.hyp()
        return hyp.hypstr if hyp is not None else ""


class SpeakerEncoder:
    """Resemblyzer's 256-d d-vector (GE2E), used as an independent speaker-similarity judge."""

    sample_rate = 16000

    def __init__(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # webrtcvad imports the deprecated pkg_resources
            from resemblyzer import VoiceEncoder, preprocess_wav
        self._preprocess = preprocess_wav
        self.encoder = VoiceEncoder(device="cpu", verbose=False)

    def embed(self, wav: np.ndarray, sr: int) -> np.ndarray:
        """L2-normalised utterance embedding (silence trimmed by resemblyzer's VAD)."""
        wav = resample(np.asarray(wav, dtype=np.float32), sr, self.sample_rate)
        return self.encoder.embed_utterance(self._preprocess(wav, source_sr=self.sample_rate))

    def similarity(self, wav_a: np.ndarray, sr_a: int, wav_b: np.ndarray, sr_b: int) -> float:
        """Cosine similarity of two utterances' embeddings; 0 when either is empty (no speech
        resembles no one)."""
        if np.asarray(wav_a).size == 0 or np.asarray(wav_b).size == 0:
            return 0.0
        return float(np.dot(self.embed(wav_a, sr_a), self.embed(wav_b, sr_b)))


def speaker_similarity(model, wav_a: np.ndarray, sr_a: int, wav_b: np.ndarray, sr_b: int) -> float:
    """Cosine similarity of two utterances' embeddings by a pipeline's own speaker model (CAM++);
    0 when either is empty."""
    if np.asarray(wav_a).size == 0 or np.asarray(wav_b).size == 0:
        return 0.0
    ea, eb = model.embed(wav_a, sr_a).reshape(-1).numpy(), model.embed(wav_b, sr_b).reshape(-1).numpy()
    return float(ea @ eb / (np.linalg.norm(ea) * np.linalg.norm(eb)))


def cosine_matrix(embeddings: np.ndarray) -> np.ndarray:
    """Pairwise cosine similarities of row vectors."""
    e = np.asarray(embeddings, dtype=np.float64)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    return e @ e.T


def trial_scores(embeddings: np.ndarray, speakers: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """All unordered pairs: (cosine scores, 1 for same speaker / 0 for different)."""
    sims = cosine_matrix(embeddings)
    i, j = np.triu_indices(len(speakers), k=1)
    labels = np.array([speakers[a] == speakers[b] for a, b in zip(i, j)], dtype=int)
    return sims[i, j], labels


def equal_error_rate(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(EER, threshold) of verification trials: the point where false accepts = false rejects."""
    from sklearn.metrics import roc_curve

    labels = np.asarray(labels)
    if labels.min() == labels.max():
        raise ValueError("EER needs both target (1) and non-target (0) trials")
    fpr, tpr, thresholds = roc_curve(labels, scores)
    fnr = 1 - tpr
    k = int(np.nanargmin(np.abs(fnr - fpr)))
    return float((fpr[k] + fnr[k]) / 2), float(thresholds[k])


# ---- end-to-end evaluation (a small Table 5 / Table 8) ---------------------------------------------
# voice set -> (splits of the target sentences, split of the prompts)
VOICE_SETS = {"heldout": (("heldout",), "heldout"), "seen": (("dev", "test"), "train")}


def synthesis_trials(corpus_root: str | Path = "data/corpus", n: int = 8, lang: str = "en",
                     voices: str = "heldout") -> list[dict]:
    """Sentences the models never trained on, each with a prompt: per trial the target record (its
    text and its corpus recording) and a prompt record of the same voice with a different sentence.
    ``voices="heldout"``: held-out voices (the zero-shot case); ``"seen"``: the dev/test sentences of
    the training voices, prompted by a training recording, to tell speaker generalisation apart from
    what the models make of the words."""
    from .data import load_manifest

    if voices not in VOICE_SETS:
        raise ValueError(f"voices must be one of {sorted(VOICE_SETS)}, got {voices!r}")
    target_splits, prompt_split = VOICE_SETS[voices]
    records = [r for split in target_splits for r in load_manifest(corpus_root, split) if r["lang"] == lang]
    prompts = [r for r in load_manifest(corpus_root, prompt_split) if r["lang"] == lang]
    if len(records) < 2:
        raise ValueError(f"the corpus under {corpus_root} has fewer than 2 {'/'.join(target_splits)} {lang} utterances")
    by_voice: dict[str, list[dict]] = {}
    for r in records:
        by_voice.setdefault(r["speaker"], []).append(r)
    voice_names = sorted(by_voice)
    trials = []
    for k in range(n):
        own = by_voice[voice_names[k % len(voice_names)]]
        target = own[(k // len(voice_names)) % len(own)]
        candidates = [r for r in prompts if r["speaker"] == target["speaker"] and r["id"] != target["id"]]
        prompt = min(candidates, key=lambda r: abs(r["duration"] - 4.0))
        trials.append({"target": target, "prompt": prompt})
    return trials


SIM_JUDGES = ("resemblyzer", "CAM++")       # the order of a row's "sims" per sentence
READABLE_WER = 0.30     # voices whose recordings pocketsphinx reads at most this badly carry the bars


def recording_wer_by_voice(corpus_root: str | Path = "data/corpus", splits: tuple[str, ...] = ("eval",),
                           lang: str = "en", per_voice: int | None = None, progress: bool = True) -> dict[str, dict]:
    """How well the judge reads each voice's own recordings: per voice, pocketsphinx's WER over
    its utterances of ``splits`` (at most ``per_voice`` of them, the first by id). pocketsphinx is
    biased against formant voices (espeak), so a synthesis is compared with its voice's recordings,
    and the bars are taken over the voices read at WER <= :data:`READABLE_WER`."""
    from tqdm.auto import tqdm

    from .audio import load_wav
    from .data import load_manifest

    records = [r for split in splits for r in load_manifest(corpus_root, split) if r["lang"] == lang]
    by_voice: dict[str, list[dict]] = {}
    for r in sorted(records, key=lambda r: r["id"]):
        by_voice.setdefault(r["speaker"], []).append(r)
    asr, table = SphinxASR(), {}
    for voice, rs in tqdm(sorted(by_voice.items()), desc="reading the recordings", disable=not progress):
        rs = rs[:per_voice]
        hyps = [asr.transcribe(*load_wav(Path(corpus_root) / r["path"])) for r in rs]
        wer = error_rate([r["text"] for r in rs], hyps, lang)
        table[voice] = {"n": len(rs), "WER": wer, "readable": wer <= READABLE_WER}
    return table


# Table 8's grid: (LM streaming = text fed in 5-token chunks, bistream; flow/vocoder streaming)
EVAL_MODES = {"offline": (False, False), "FM stream": (False, True), "LM stream": (True, False),
              "LM+FM stream": (True, True)}
# the LM given no prompt (``inference_cross_lingual``: the flow keeps the prompt's voice): against
# "offline", what continuing the prompt's speech tokens costs the LM (the zero-shot layout); offline
# and, for Table 8 in this layout, with text-in streaming and the flow streaming
NO_LM_PROMPT = "no LM prompt"
NO_LM_PROMPT_MODES = {NO_LM_PROMPT: (False, False), f"{NO_LM_PROMPT} LM+FM stream": (True, True)}


def _word_stream(text: str) -> Iterator[str]:
    """Normalised text handed over word by word, as an upstream text LLM would (text-in streaming)."""
    words = normalize_text(text).split(" ")
    for i, w in enumerate(words):
        yield w + (" " if i < len(words) - 1 else "")


def evaluate_tts(tts, corpus_root: str | Path = "data/corpus", n: int = 8, modes: tuple[str, ...] = ("offline", "FM stream"),
                 seed: int = 0, incremental: bool = False, progress: bool = True, voices: str = "heldout") -> dict[str, dict[str, float]]:
    """WER (pocketsphinx) and speaker similarity to the prompt (resemblyzer and the pipeline's own
    CAM++) of zero-shot synthesis on :func:`synthesis_trials`, per mode of :data:`EVAL_MODES`, next
    to the same numbers for the corpus recordings themselves ("corpus audio"). Also the mean RTF
    and first-package latency."""
    from tqdm.auto import tqdm

    from .audio import load_wav

    root = Path(corpus_root)
    asr, judge = SphinxASR(), SpeakerEncoder()

    unknown = set(modes) - EVAL_MODES.keys()
    if unknown:
        raise ValueError(f"unknown evaluation modes {sorted(unknown)}; choose from {list(EVAL_MODES)}")
    trials = synthesis_trials(root, n, voices=voices)
    rows: dict[str, dict[str, list]] = {m: {"ref": [], "hyp": [], "sim": [], "sim_campp": [], "rtf": [], "fpl": []}
                                        for m in ("corpus audio", *modes)}
    for trial in tqdm(trials, desc="synthesis evaluation", disable=not progress):
        target, prompt = trial["target"], trial["prompt"]
        prompt_wav, psr = load_wav(root / prompt["path"])
        outputs = {"corpus audio": (load_wav(root / target["path"]), None)}
        for mode in modes:
            lm_stream, fm_stream = EVAL_MODES[mode]
            text = _word_stream(target["text"]) if lm_stream else target["text"]
            chunks = list(tts.inference_zero_shot(text, prompt["text"], (prompt_wav, psr), stream=fm_stream,
                                                  seed=seed, incremental=incremental))
            wav = join_speech(chunks)[0].numpy()
            outputs[mode] = ((wav, tts.sample_rate), chunks[-1]["totals"])
        for mode, ((wav, sr), totals) in outputs.items():
            row = rows[mode]
            row["ref"].append(target["text"])
            row["hyp"].append(asr.transcribe(wav, sr))
            row["sim"].append(judge.similarity(wav, sr, prompt_wav, psr))
            row["sim_campp"].append(speaker_similarity(tts.frontend.speaker_model, wav, sr, prompt_wav, psr))
            if totals is not None:
                row["rtf"].append(totals["rtf"])
                row["fpl"].append(totals["first_package_s"])
    table = {}
    for mode, row in rows.items():
        table[mode] = {"WER": error_rate(row["ref"], row["hyp"], "en"), "SIM (resemblyzer)": float(np.mean(row["sim"])),
                       "SIM (CAM++)": float(np.mean(row["sim_campp"])), "n": len(row["ref"])}
        if row["rtf"]:
            table[mode].update({"RTF": float(np.mean(row["rtf"])), "first package (s)": float(np.mean(row["fpl"]))})
    return table


def voice_trials(corpus_root: str | Path, voices: str = "heldout", per_voice: int = 20, lang: str = "en") -> dict[str, list[dict]]:
    """Per voice of the set (:data:`VOICE_SETS`), up to ``per_voice`` target records, each with a
    prompt record of the same voice (a different sentence, about 4 s; never one of the large
    corpus' second helping, :data:`~minicosy.data.MORE_TIER`, so that growing the corpus leaves
    every evaluation as it was). The targets are the ``eval`` split where the corpus has one (the
    large corpus: the same sentences read by every voice, in no training, dev or tokenizer data),
    else the set's own splits."""
    from .data import MORE_TIER, load_manifest

    if voices not in VOICE_SETS:
        raise ValueError(f"voices must be one of {sorted(VOICE_SETS)}, got {voices!r}")
    target_splits, prompt_split = VOICE_SETS[voices]
    names = {r["speaker"] for split in target_splits for r in load_manifest(corpus_root, split) if r["lang"] == lang}
    evaluation = [r for r in load_manifest(corpus_root, "eval") if r["speaker"] in names]
    targets = evaluation or [r for split in target_splits for r in load_manifest(corpus_root, split) if r["lang"] == lang]
    prompts = [r for r in load_manifest(corpus_root, prompt_split) if r["lang"] == lang and not r.get(MORE_TIER)]
    trials: dict[str, list[dict]] = {}
    for voice in sorted(names):
        own = sorted((r for r in targets if r["speaker"] == voice), key=lambda r: r["id"])[:per_voice]
        prompt = min((r for r in prompts if r["speaker"] == voice and r["text"] not in {t["text"] for t in own}),
                     key=lambda r: abs(r["duration"] - 4.0))
        trials[voice] = [{"target": t, "prompt": prompt} for t in own]
    return trials


def evaluate_voices(tts, corpus_root: str | Path = "data/corpus", voices: str = "heldout", per_voice: int = 20,
                    modes: tuple[str, ...] = ("offline",), seed: int = 0, progress: bool = True) -> dict:
    """Each voice's synthesis next to its own recordings of the same sentences: per voice of
    :func:`voice_trials`, pocketsphinx's WER of the recordings and of zero-shot synthesis in each
    mode (a voice's own recording is the prompt), their ratio, and speaker similarity to the prompt
    (resemblyzer, CAM++); :data:`NO_LM_PROMPT_MODES` leave the prompt out of the LM. A mode of
    :data:`TRUE_INPUT_MODES` re-makes each recording from its true
    mel or tokens instead (:func:`true_input_audio`): the stage table, per voice. ``"readable"``
    pools the voices whose recordings are read at WER <= :data:`READABLE_WER`, where the
    intelligibility bars are taken (ratios of pooled WERs)."""
    from tqdm.auto import tqdm

    from .audio import load_wav

    unknown = set(modes) - {*EVAL_MODES, *TRUE_INPUT_MODES, *NO_LM_PROMPT_MODES}
    if unknown:
        raise ValueError(f"unknown evaluation modes {sorted(unknown)}; "
                         f"choose from {[*EVAL_MODES, *TRUE_INPUT_MODES, *NO_LM_PROMPT_MODES]}")
    root, asr, judge = Path(corpus_root), SphinxASR(), SpeakerEncoder()
    trials = voice_trials(root, voices, per_voice)
    true_input = [m for m in modes if m in TRUE_INPUT_MODES]
    rows: dict[str, dict] = {}
    for voice, vtrials in tqdm(trials.items(), desc=f"{voices} voices", disable=not progress):
        texts = [t["target"]["text"] for t in vtrials]
        hyps: dict[str, list[str]] = {"recordings": [], **{m: [] for m in modes}}
        sims: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
        for trial in vtrials:
            target, prompt = trial["target"], trial["prompt"]
            prompt_wav, psr = load_wav(root / prompt["path"])
            hyps["recordings"].append(asr.transcribe(*load_wav(root / target["path"])))
            if true_input:          # the recording at the model's rate and the prompt's features, once per trial
                recording = load_wav(root / target["path"], tts.sample_rate)[0]
                features = tts.frontend.prompt((prompt_wav, psr))
            for mode in modes:
                if mode in TRUE_INPUT_MODES:
                    wav = true_input_audio(tts, mode, recording, features, seed)
                else:
                    lm_stream, fm_stream = {**EVAL_MODES, **NO_LM_PROMPT_MODES}[mode]
                    text = _word_stream(target["text"]) if lm_stream else target["text"]
                    run = (tts.inference_cross_lingual(text, (prompt_wav, psr), stream=fm_stream, seed=seed)
                           if mode in NO_LM_PROMPT_MODES else
                           tts.inference_zero_shot(text, prompt["text"], (prompt_wav, psr), stream=fm_stream, seed=seed))
                    wav = join_speech(run)[0].numpy()
                hyps[mode].append(asr.transcribe(wav, tts.sample_rate))
                sims[mode].append((judge.similarity(wav, tts.sample_rate, prompt_wav, psr),
                                   speaker_similarity(tts.frontend.speaker_model, wav, tts.sample_rate, prompt_wav, psr)))
        row = {"n": len(texts), "refs": texts, "hyps": hyps, "sims": {m: np.asarray(v).T.tolist() for m, v in sims.items()},
               "WER recordings": error_rate(texts, hyps["recordings"], "en")}
        for mode in modes:
            row[f"WER {mode}"] = error_rate(texts, hyps[mode], "en")
            for name, values in zip(SIM_JUDGES, row["sims"][mode]):
                row[f"SIM {mode} ({name})"] = float(np.mean(values))
        row["readable"] = row["WER recordings"] <= READABLE_WER
        rows[voice] = row
    pooled = {}
    for name, members in (("readable", [v for v, r in rows.items() if r["readable"]]), ("all", list(rows))):
        refs = [t for v in members for t in rows[v]["refs"]]
        if not refs:
            continue
        errors = {}
        for m in ("recordings", *modes):
            errors[m], words = sentence_errors(refs, [h for v in members for h in rows[v]["hyps"][m]], "en")
        p = pooled[name] = {"voices": members, "n": len(refs), "WER recordings": wer_of(errors["recordings"], words)}
        for mode in modes:
            p[f"WER {mode}"] = wer_of(errors[mode], words)
            p[f"ratio {mode}"] = p[f"WER {mode}"] / max(p["WER recordings"], 1e-9)
            if len(refs) > 1:
                p[f"WER {mode} 95%"] = bootstrap_interval(wer_of, errors[mode], words)
                p[f"ratio {mode} 95%"] = bootstrap_interval(
                    lambda e, r, w: wer_of(e, w) / max(wer_of(r, w), 1e-9), errors[mode], errors["recordings"], words)
                if mode != modes[0]:                               # Table 8: a mode against the first
                    p[f"delta {mode} 95%"] = bootstrap_interval(wer_difference, errors[mode], errors[modes[0]], words)
    return {"voices": rows, "pooled": pooled, "set": voices, "modes": list(modes)}


def compare_voice_results(a: dict, b: dict, pool: str = "readable") -> dict[str, dict]:
    """Two :func:`evaluate_voices` results on the same sentences (e.g. two checkpoints), per mode
    both have: pooled WER of each, B - A, and its paired bootstrap 95 % interval over sentences;
    the same for the mean speaker similarity by each judge (``"SIM CAM++"`` ...)."""
    if pool not in a["pooled"] or pool not in b["pooled"]:
        raise ValueError(f"both results need the pooled set {pool!r}")
    voices = a["pooled"][pool]["voices"]
    refs = [t for v in voices for t in a["voices"][v]["refs"]]
    if voices != b["pooled"][pool]["voices"] or refs != [t for v in voices for t in b["voices"][v]["refs"]]:
        raise ValueError("the two results were not measured on the same voices and sentences")
    out = {}
    for mode in [m for m in a["modes"] if m in b["modes"]]:
        (ea, words), (eb, _) = (sentence_errors(refs, [h for v in voices for h in r["voices"][v]["hyps"][mode]], "en")
                                for r in (a, b))
        out[mode] = {"n": len(refs), "WER A": wer_of(ea, words), "WER B": wer_of(eb, words),
                     "B - A": wer_difference(eb, ea, words), "95%": bootstrap_interval(wer_difference, eb, ea, words)}
        for j, judge in enumerate(SIM_JUDGES):
            sa, sb = (np.array([x for v in voices for x in r["voices"][v]["sims"][mode][j]]) for r in (a, b))
            out[mode][f"SIM {judge}"] = {"A": float(sa.mean()), "B": float(sb.mean()), "B - A": float((sb - sa).mean()),
                                         "95%": bootstrap_interval(np.mean, sb - sa)}
    return out


def format_comparison(a: dict, b: dict) -> str:
    """:func:`compare_voice_results` as text, for the readable and the all-voices pools."""
    lines = []
    for pool in [p for p in ("readable", "all") if p in a["pooled"] and p in b["pooled"]]:
        lines.append(f"pooled: {pool} (B - A, paired bootstrap 95% interval over sentences)")
        for mode, c in compare_voice_results(a, b, pool).items():
            lines.append(f"  {mode:14s} n={c['n']:3d}  WER A {c['WER A']:.3f}  WER B {c['WER B']:.3f}"
                         f"  B - A {c['B - A']:+.3f}  95% [{c['95%'][0]:+.3f}, {c['95%'][1]:+.3f}]")
            lines += [f"  {'':14s} SIM {judge:11s}  A {d['A']:.3f}  B {d['B']:.3f}  B - A {d['B - A']:+.3f}"
                      f"  95% [{d['95%'][0]:+.3f}, {d['95%'][1]:+.3f}]" for judge, d in
                      ((j, c[f"SIM {j}"]) for j in SIM_JUDGES)]
    return "\n".join(lines)


def format_voice_table(result: dict) -> str:
    """:func:`evaluate_voices`'s result as text: a row per voice, then the pooled rows."""
    modes = result["modes"]
    head = f"{'voice':18s} {'n':>4s} {'WER rec.':>9s}" + "".join(f" {'WER ' + m:>16s} {'ratio':>6s}" for m in modes)
    lines = [head]
    for voice, r in result["voices"].items():
        lines.append(f"{voice:18s} {r['n']:4d} {r['WER recordings']:9.3f}" + "".join(
            f" {r['WER ' + m]:16.3f} {r['WER ' + m] / max(r['WER recordings'], 1e-9):6.2f}" for m in modes)
            + ("" if r["readable"] else "   (not readable by the judge)"))
    for name, p in result["pooled"].items():
        lines.append(f"{'pooled: ' + name:18s} {p['n']:4d} {p['WER recordings']:9.3f}" + "".join(
            f" {p['WER ' + m]:16.3f} {p['ratio ' + m]:6.2f}" for m in modes))
        lines += [f"{'':23s} 95% (bootstrap): WER {m} [{p[f'WER {m} 95%'][0]:.3f}, {p[f'WER {m} 95%'][1]:.3f}],"
                  f" ratio [{p[f'ratio {m} 95%'][0]:.2f}, {p[f'ratio {m} 95%'][1]:.2f}]"
                  for m in modes if f"WER {m} 95%" in p]
        lines += [f"{'':23s} {m} - {modes[0]}: {p['WER ' + m] - p['WER ' + modes[0]]:+.3f},"
                  f" 95% [{p[f'delta {m} 95%'][0]:+.3f}, {p[f'delta {m} 95%'][1]:+.3f}]"
                  for m in modes[1:] if f"delta {m} 95%" in p]
    return "\n".join(lines)


def format_table(table: dict[str, dict[str, float]]) -> str:
    """A plain-text table of :func:`evaluate_tts`'s result (rows = modes)."""
    cols = ["WER", "SIM (resemblyzer)", "SIM (CAM++)", "RTF", "first package (s)", "n"]
    lines = [f"{'':14s}" + "".join(f"{c:>19s}" for c in cols)]
    for mode, row in table.items():
        cells = [f"{row[c]:>19.3f}" if isinstance(row.get(c), float) else f"{row.get(c, '-')!s:>19s}" for c in cols]
        lines.append(f"{mode:14s}" + "".join(cells))
    return "\n".join(lines)


STAGES = ("corpus audio", "Griffin-Lim on the true mel", "HiFT on the true mel", "flow on the true tokens + HiFT",
          "LM + flow + HiFT (zero-shot)")
# the middle stages as evaluation modes of :func:`evaluate_voices` (the stage table per voice)
TRUE_INPUT_MODES = dict(zip(("GL true mel", "HiFT true mel", "flow true tokens"), STAGES[1:4]))


@torch.inference_mode()
def flow_on_true_tokens(tts, wav: np.ndarray, prompt) -> torch.Tensor:
    """The flow's mel (1, 80, T) from a recording's own speech tokens (``wav`` at
    ``tts.sample_rate``, §2.2's tokenizer), in the voice of ``prompt`` (a frontend
    :class:`~minicosy.frontend.Prompt`): what a perfect LM would hand the flow."""
    tokens = torch.as_tensor(tts.frontend.speech_tokenizer.tokenize(wav, tts.sample_rate)).long().reshape(1, -1)
    return tts.flow.inference(tokens.to(tts.device), prompt.speech_token.to(tts.device),
                              prompt.speech_feat.to(tts.device, tts.dtype), prompt.embedding.to(tts.device, tts.dtype))


@torch.inference_mode()
def true_input_audio(tts, mode: str, wav: np.ndarray, prompt, seed: int = 0) -> np.ndarray:
    """A recording ``wav`` (at ``tts.sample_rate``) re-made from a true input, one of
    :data:`TRUE_INPUT_MODES`: Griffin-Lim or HiFT on its mel, or the flow on its own speech tokens
    (§2.2's tokenizer) in the voice of ``prompt`` (a frontend :class:`~minicosy.frontend.Prompt`),
    then HiFT: what a perfect LM (or flow) would leave the rest of the chain to lose."""
    from .audio import mel_spectrogram
    from .hift_train import griffin_lim

    if mode not in TRUE_INPUT_MODES:
        raise ValueError(f"unknown true-input mode {mode!r}; choose from {list(TRUE_INPUT_MODES)}")
    if mode == "flow true tokens":
        mel = flow_on_true_tokens(tts, wav, prompt)
    else:
        mel = mel_spectrogram(wav)[None]
        if mode == "GL true mel":
            return griffin_lim(mel[0]).numpy()
    return tts.vocode(mel, seed)


@torch.inference_mode()
def stage_outputs(tts, corpus_root: str | Path = "data/corpus", n: int = 8, seed: int = 0,
                  voices: str = "heldout") -> Iterator[tuple[dict, list[np.ndarray]]]:
    """Per :func:`synthesis_trials` trial, its target record and the audio after each of
    :data:`STAGES`: the recording itself, each vocoder on its true mel, the flow on its true speech
    tokens (in the prompt's voice) + HiFT, and the whole zero-shot pipeline (the LM's own tokens)."""
    from .audio import load_wav

    root, sr = Path(corpus_root), tts.sample_rate
    for trial in synthesis_trials(root, n, voices=voices):
        target, prompt_rec = trial["target"], trial["prompt"]
        wav, _ = load_wav(root / target["path"], sr)
        prompt = tts.frontend.prompt(str(root / prompt_rec["path"]), prompt_rec["text"])
        yield target, [wav, *(true_input_audio(tts, mode, wav, prompt, seed) for mode in TRUE_INPUT_MODES),
                       join_speech(tts.inference_zero_shot(target["text"], prompt_rec["text"],
                                                           str(root / prompt_rec["path"]), seed=seed))[0].numpy()]


def stage_wer(tts, corpus_root: str | Path = "data/corpus", n: int = 8, seed: int = 0,
              voices: str = "heldout", outputs: list | None = None) -> dict[str, float]:
    """Where intelligibility is lost: pocketsphinx's WER after each of :func:`stage_outputs`'s stages
    (``outputs``: that generator's items, already synthesised, to score them more than one way)."""
    asr, refs = SphinxASR(), []
    hyps: dict[str, list[str]] = {stage: [] for stage in STAGES}
    for target, audios in outputs or stage_outputs(tts, corpus_root, n, seed, voices):
        refs.append(target["text"])
        for stage, audio in zip(STAGES, audios):
            hyps[stage].append(asr.transcribe(audio, tts.sample_rate))
    return {stage: error_rate(refs, h, "en") for stage, h in hyps.items()}


def stage_unit_error(tts, corpus_root: str | Path = "data/corpus", n: int = 8, seed: int = 0,
                     voices: str = "heldout", outputs: list | None = None) -> dict[str, float]:
    """What the speech tokens carry through each stage: the unit error of the speech tokenizer's own
    ASR head (§2.2) reading each of :func:`stage_outputs`'s outputs (or ``outputs``, as in
    :func:`stage_wer`). On the recordings it is the tokens' own loss; a stage that keeps what the
    tokens say stays near it."""
    from .speech_tokenizer import transcript, unit_error_rate

    tokenizer, refs = tts.frontend.speech_tokenizer, []
    if not hasattr(tokenizer, "read_units"):
        raise ValueError("stage_unit_error needs minicosy's own speech tokenizer and its ASR head; "
                         "the official ONNX tokenizer has no ASR head")
    hyps: dict[str, list[list[str]]] = {stage: [] for stage in STAGES}
    for target, audios in outputs or stage_outputs(tts, corpus_root, n, seed, voices):
        refs.append(transcript(target["text"], target["lang"]))
        for stage, audio in zip(STAGES, audios):
            hyps[stage].append(tokenizer.read_units(audio, tts.sample_rate))
    return {stage: unit_error_rate(refs, h) for stage, h in hyps.items()}
