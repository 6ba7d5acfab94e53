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

import numpy as np

from .audio import resample
from .textnorm import CHAR_LANGS, normalize_for_wer


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
