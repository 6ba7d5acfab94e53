"""The front-end of synthesis (Fig. 1 left; official ``CosyVoiceFrontEnd``, NOTES.md §6-7): text ->
normalised sentences -> BPE ids, and a prompt recording -> speech tokens, flow mel and x-vector.

Usage::

    fe = Frontend(text_tokenizer, speech_tokenizer, speaker_model)
    fe.sentences("It costs $5. Then we go.")       # ['It costs five dollars. Then we go.']
    prompt = fe.prompt("voice.wav", "Transcript of voice.wav.")
    prompt.speech_token.shape, prompt.speech_feat.shape, prompt.embedding.shape   # (1,P) (1,2P,80) (1,192)
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Union

import numpy as np
import torch

from .audio import RESAMPLERS, load_wav, mel_spectrogram, resample
from .text_tokenizer import COSYVOICE_SPECIAL_TOKENS, QWEN_SPECIAL_TOKENS, TextTokenizer, UnitTokenizer
from .textnorm import normalize_text, split_sentences

# special tokens in user text, kept whole (the one-or-more-word check looks past them)
SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in sorted(QWEN_SPECIAL_TOKENS + COSYVOICE_SPECIAL_TOKENS,
                                                                    key=len, reverse=True)) + r"|<\|[^|<>]*\|>)")
MIN_PROMPT_SECONDS = 1.0
MAX_PROMPT_SECONDS = 30.0     # the official speech tokenizer refuses longer audio (NOTES.md §6)
SILENCE_PEAK = 1e-3
MAX_FLOAT_PEAK = 2.0           # float audio louder than this is not [-1, 1] audio (e.g. PCM as float)

# a path, (waveform, sample_rate), or a bare waveform at 16 kHz (the official ``prompt_speech_16k``)
PromptAudio = Union[str, Path, tuple, np.ndarray, torch.Tensor]


class Tokenizes(Protocol):
    def tokenize(self, wav: np.ndarray, sr: int) -> torch.Tensor: ...


class Embeds(Protocol):
    def embed(self, wav: np.ndarray, sr: int) -> torch.Tensor: ...


@dataclass
class Prompt:
    """What a prompt recording gives the LM and the flow (official ``frontend_zero_shot``)."""

    text_ids: list[int]            # normalised prompt transcript (empty when not needed)
    speech_token: torch.Tensor     # (1, P) int64, 25 Hz
    speech_feat: torch.Tensor      # (1, 2P, 80) flow mel, 50 Hz
    embedding: torch.Tensor        # (1, 192) CAM++ x-vector
    seconds: float                 # duration of the recording


def pcm_to_float(wav: np.ndarray | torch.Tensor, what: str = "audio") -> np.ndarray:
    """Float32 samples in [-1, 1] from float or integer PCM (int16 / int32 scaled by their full
    scale, uint8 centred on 128). Boolean, complex and other non-audio arrays, and float samples
    far outside [-1, 1] (integer PCM stored as float), are ``ValueError``s."""
    wav = wav.detach().cpu().numpy() if isinstance(wav, torch.Tensor) else np.asarray(wav)
    if wav.dtype == np.uint8:
        return (wav.astype(np.float32) - 128.0) / 128.0
    if np.issubdtype(wav.dtype, np.signedinteger):
        return (wav / float(np.iinfo(wav.dtype).max + 1)).astype(np.float32)
    if not np.issubdtype(wav.dtype, np.floating):
        raise ValueError(f"{what}: samples must be float or integer PCM, got {wav.dtype} values")
    peak = float(np.abs(wav).max()) if wav.size and np.isfinite(wav).all() else 0.0
    if peak > MAX_FLOAT_PEAK:
        raise ValueError(f"{what}: float samples must lie within [-1, 1], got a peak of {peak:g} "
                         "(integer PCM? pass it as an integer array, or divide it by 32768)")
    return wav.astype(np.float32)


def read_prompt_audio(audio: PromptAudio, what: str = "prompt audio") -> tuple[np.ndarray, int]:
    """Mono float32 waveform and rate of any supported prompt; checks its length and loudness.
    Raises ``FileNotFoundError`` / ``ValueError`` naming the problem."""
    if isinstance(audio, (str, Path)):
        wav, sr = load_wav(audio)
    elif isinstance(audio, tuple):
        if len(audio) != 2 or isinstance(audio[1], (bool, np.bool_)) or not isinstance(audio[1], numbers.Real):
            raise ValueError(f"{what}: a tuple must be (waveform, sample_rate as a number), got "
                             f"({', '.join(type(a).__name__ for a in audio)})")
        wav, sr = audio
    elif isinstance(audio, (np.ndarray, torch.Tensor)):
        wav, sr = audio, 16000
    else:
        raise ValueError(f"{what} must be a path, (waveform, sample_rate) or a 16 kHz waveform, got {type(audio).__name__}")
    if not math.isfinite(sr) or sr < 1000:
        raise ValueError(f"{what}: the sample rate must be a number of at least 1000 Hz, got {sr!r}")
    wav, sr = pcm_to_float(wav, what), int(round(sr))
    if wav.ndim == 2:                        # (channels, samples) or (samples, channels): downmix
        wav = wav.mean(axis=0 if wav.shape[0] < wav.shape[1] else 1)
    if wav.ndim != 1:
        raise ValueError(f"{what}: expected a mono or multi-channel waveform, got shape {wav.shape}")
    seconds = wav.size / sr
    if seconds < MIN_PROMPT_SECONDS:
        raise ValueError(f"{what} is too short: {seconds:.2f} s, need at least {MIN_PROMPT_SECONDS:.0f} s")
    if seconds > MAX_PROMPT_SECONDS:
        raise ValueError(f"{what} is too long: {seconds:.1f} s, at most {MAX_PROMPT_SECONDS:.0f} s")
    if not np.isfinite(wav).all():
        raise ValueError(f"{what} contains NaN or infinite samples")
    if float(np.abs(wav).max()) < SILENCE_PEAK:
        raise ValueError(f"{what} is silent (peak below {SILENCE_PEAK})")
    return wav.astype(np.float32), int(sr)


class Frontend:
    """Text and prompt processing shared by every inference mode. ``resampling`` is how a prompt
    reaches 16 kHz (tokens, x-vector) and the flow's rate (mel): ``"soxr"`` for minicosy's own
    models, ``"sinc"`` (the official ``torchaudio`` resampler, :func:`~minicosy.audio.resample_sinc`)
    where the official folder is used."""

    def __init__(self, text_tokenizer: TextTokenizer | UnitTokenizer, speech_tokenizer: Tokenizes,
                 speaker_model: Embeds, sample_rate: int = 24000, token_mel_ratio: int = 2,
                 resampling: str = "soxr") -> None:
        if resampling not in RESAMPLERS:
            raise ValueError(f"unknown resampling method {resampling!r}; choose one of {RESAMPLERS}")
        self.text_tokenizer, self.speech_tokenizer, self.speaker_model = text_tokenizer, speech_tokenizer, speaker_model
        self.sample_rate, self.token_mel_ratio, self.resampling = sample_rate, token_mel_ratio, resampling

    def sentences(self, text: str, normalize: bool = True) -> list[str]:
        """Normalised sentences to synthesise one by one (official ``text_normalize(split=True)``).

        What user text may hold: any Unicode text, plus the special tokens of
        :data:`~minicosy.text_tokenizer.COSYVOICE_SPECIAL_TOKENS` (``[breath]``, ``<strong>`` …) and
        ``<|...|>`` tokens, which are kept whole. Text holding ``<|...|>`` tokens is not split into
        sentences (as officially) but its words are still normalised around them. Text without a
        single letter or digit outside the special tokens, and text that is not valid Unicode (a
        lone surrogate), are ``ValueError``s."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str or an iterable of str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"text is not valid Unicode at position {e.start} (a lone surrogate?)") from None
        if not text.strip():
            raise ValueError("text is empty: nothing to synthesise")
        if not re.search(r"\w", SPECIAL_RE.sub(" ", text)):
            raise ValueError(f"text {text[:80]!r} has nothing to say (no word outside the special tokens)")
        if "<|" in text:
            parts = SPECIAL_RE.split(text.strip())
            return ["".join(p if k % 2 or not normalize or not p.strip()
                            else p[:len(p) - len(p.lstrip())] + normalize_text(p.strip()) + p[len(p.rstrip()):]
                            for k, p in enumerate(parts))]
        if not normalize:
            return [text.strip()]
        pieces = split_sentences(normalize_text(text))
        if not pieces:
            raise ValueError(f"text {text!r} has nothing to say (punctuation only)")
        return pieces

    def text_ids(self, text: str, normalize: bool = True) -> list[int]:
        """BPE ids of one piece of text (no BOS/EOS)."""
        return self.text_tokenizer.encode(normalize_text(text) if normalize else text)

    def text_id_stream(self, pieces: Iterable[str]) -> Iterator[list[int]]:
        """Text-in streaming: ids of each piece as it arrives (not normalised, as officially)."""
        for piece in pieces:
            if not isinstance(piece, str):
                raise ValueError(f"a text stream must yield str, got {type(piece).__name__}")
            ids = self.text_tokenizer.encode(piece)
            if ids:
                yield ids

    def prompt(self, audio: PromptAudio, prompt_text: str | None = None, normalize: bool = True) -> Prompt:
        """Speech tokens, mel and x-vector of a prompt recording, trimmed to a common length (2 mel
        frames per token), and the ids of its transcript if given."""
        wav, sr = read_prompt_audio(audio)
        wav16 = resample(wav, sr, 16000, self.resampling)
        token = torch.as_tensor(self.speech_tokenizer.tokenize(wav16, 16000)).long().reshape(1, -1)
        feat = mel_spectrogram(resample(wav, sr, self.sample_rate, self.resampling)).T.unsqueeze(0)   # (1, F, 80)
        n = min(feat.shape[1] // self.token_mel_ratio, token.shape[1])
        embedding = torch.as_tensor(self.speaker_model.embed(wav16, 16000)).float().reshape(1, -1)
        text_ids: list[int] = []
        if prompt_text is not None:
            if not isinstance(prompt_text, str) or not prompt_text.strip():
                raise ValueError("prompt_text is empty: zero-shot needs the transcript of the prompt audio")
            text_ids = self.text_ids(prompt_text, normalize)
        return Prompt(text_ids, token[:, :n], feat[:, :self.token_mel_ratio * n].contiguous(), embedding, wav.size / sr)
