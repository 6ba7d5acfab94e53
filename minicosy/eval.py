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


def error_rate(references: list[str], hypotheses: list[str], lang: str) -> float:
    """Corpus-level WER for English, CER for zh/ja/ko (as in the paper's tables)."""
    import jiwer

    if len(references) != len(hypotheses) or not references:
        raise ValueError("need the same, non-zero number of references and hypotheses")
    refs = [normalize_for_wer(r, lang) for r in references]
    hyps = [normalize_for_wer(h, lang) for h in hypotheses]
    if any(not r for r in refs):
        raise ValueError("a reference is empty after normalisation")
    if lang in CHAR_LANGS:
        return float(jiwer.cer(refs, hyps))
    return float(jiwer.wer(refs, hyps))


class SphinxASR:
    """English speech recognition with pocketsphinx's bundled US-English models (16 kHz)."""

    sample_rate = 16000

    def __init__(self) -> None:
        from pocketsphinx import Decoder

        self.decoder = Decoder(samprate=self.sample_rate, loglevel="FATAL")

    def transcribe(self, wav: np.ndarray, sr: int) -> str:
        """Lower-case transcript of one mono float waveform."""
        wav = resample(np.asarray(wav, dtype=np.float32), sr, self.sample_rate)
        pcm = (np.clip(wav, -1.0, 1.0) * 32767).astype(np.int16).tobytes()
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
        """Cosine similarity of two utterances' embeddings."""
        return float(np.dot(self.embed(wav_a, sr_a), self.embed(wav_b, sr_b)))


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
def synthesis_trials(corpus_root: str | Path = "data/corpus", n: int = 8, lang: str = "en") -> list[dict]:
    """Held-out sentences spoken by held-out voices: per trial the target record (its text and its
    corpus recording) and a prompt record of the same voice with a different sentence."""
    from .data import load_manifest

    records = [r for r in load_manifest(corpus_root, "heldout") if r["lang"] == lang]
    if len(records) < 2:
        raise ValueError(f"the corpus under {corpus_root} has fewer than 2 held-out {lang} utterances")
    by_voice: dict[str, list[dict]] = {}
    for r in records:
        by_voice.setdefault(r["speaker"], []).append(r)
    voices = sorted(by_voice)
    trials = []
    for k in range(n):
        own = by_voice[voices[k % len(voices)]]
        target = own[(k // len(voices)) % len(own)]
        prompt = min((r for r in own if r["id"] != target["id"]), key=lambda r: abs(r["duration"] - 4.0))
        trials.append({"target": target, "prompt": prompt})
    return trials


# Table 8's grid: (LM streaming = text fed in 5-token chunks, bistream; flow/vocoder streaming)
EVAL_MODES = {"offline": (False, False), "FM stream": (False, True), "LM stream": (True, False),
              "LM+FM stream": (True, True)}


def _word_stream(text: str) -> Iterator[str]:
    """Normalised text handed over word by word, as an upstream text LLM would (text-in streaming)."""
    words = normalize_text(text).split(" ")
    for i, w in enumerate(words):
        yield w + (" " if i < len(words) - 1 else "")


def evaluate_tts(tts, corpus_root: str | Path = "data/corpus", n: int = 8, modes: tuple[str, ...] = ("offline", "FM stream"),
                 seed: int = 0, incremental: bool = False, progress: bool = True) -> dict[str, dict[str, float]]:
    """WER (pocketsphinx) and speaker similarity to the prompt (resemblyzer and the pipeline's own
    CAM++) of zero-shot synthesis on :func:`synthesis_trials`, per mode of :data:`EVAL_MODES`, next
    to the same numbers for the corpus recordings themselves ("corpus audio"). Also the mean RTF
    and first-package latency."""
    from tqdm.auto import tqdm

    from .audio import load_wav

    root = Path(corpus_root)
    asr, judge = SphinxASR(), SpeakerEncoder()
    campp = tts.frontend.speaker_model

    def campp_sim(a: np.ndarray, sr_a: int, b: np.ndarray, sr_b: int) -> float:
        ea, eb = campp.embed(a, sr_a).reshape(-1).numpy(), campp.embed(b, sr_b).reshape(-1).numpy()
        return float(ea @ eb / (np.linalg.norm(ea) * np.linalg.norm(eb)))

    unknown = set(modes) - EVAL_MODES.keys()
    if unknown:
        raise ValueError(f"unknown evaluation modes {sorted(unknown)}; choose from {list(EVAL_MODES)}")
    trials = synthesis_trials(root, n)
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
            row["sim_campp"].append(campp_sim(wav, sr, prompt_wav, psr))
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


@torch.inference_mode()
def stage_wer(tts, corpus_root: str | Path = "data/corpus", n: int = 8, seed: int = 0) -> dict[str, float]:
    """Where intelligibility is lost: pocketsphinx's WER on :func:`synthesis_trials` after each
    stage, from the recordings themselves, through each vocoder on their true mel and the flow on
    their true speech tokens, to the whole zero-shot pipeline (the LM's own tokens)."""
    from .audio import load_wav, mel_spectrogram
    from .hift import griffin_lim

    root, asr, sr = Path(corpus_root), SphinxASR(), tts.sample_rate

    def vocode(mel: torch.Tensor) -> np.ndarray:
        generator = torch.Generator(tts.device).manual_seed(seed)
        return tts.hift.inference(mel.float().to(tts.device), generator=generator)[0][0].cpu().numpy()

    refs: list[str] = []
    hyps: dict[str, list[str]] = {stage: [] for stage in STAGES}
    for trial in synthesis_trials(root, n):
        target, prompt_rec = trial["target"], trial["prompt"]
        wav, _ = load_wav(root / target["path"], sr)
        mel = mel_spectrogram(wav)
        prompt = tts.frontend.prompt(str(root / prompt_rec["path"]), prompt_rec["text"])
        tokens = torch.as_tensor(tts.frontend.speech_tokenizer.tokenize(wav, sr)).long().reshape(1, -1)
        flow_mel = tts.flow.inference(tokens.to(tts.device), prompt.speech_token.to(tts.device),
                                      prompt.speech_feat.to(tts.device, tts.dtype), prompt.embedding.to(tts.device, tts.dtype))
        outputs = [wav, griffin_lim(mel).numpy(), vocode(mel[None]), vocode(flow_mel),
                   join_speech(tts.inference_zero_shot(target["text"], prompt_rec["text"], str(root / prompt_rec["path"]),
                                                       seed=seed))[0].numpy()]
        refs.append(target["text"])
        for stage, audio in zip(STAGES, outputs):
            hyps[stage].append(asr.transcribe(audio, sr))
    return {stage: error_rate(refs, h, "en") for stage, h in hyps.items()}
