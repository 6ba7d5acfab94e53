"""Audio I/O and the three front-end features of CosyVoice 2 (NOTES.md §6).

================================  ===========  ===========================================
feature                           rate         used by
================================  ===========  ===========================================
:func:`mel_spectrogram`           24 kHz, 50/s flow matching target/prompt (§2.4), HiFT input
:func:`whisper_log_mel`           16 kHz, 100/s supervised speech tokenizer input (§2.2)
:func:`kaldi_fbank`               16 kHz, 100/s CAM++ speaker embedding (mean-normalised)
================================  ===========  ===========================================

All three reproduce the official code's outputs (``shared/reference/golden/frontend_fixtures.pt``):
the mel and Whisper features with ``torch.stft`` and librosa's Slaney mel filters, the Kaldi fbank
re-implemented here in float64 (Povey window, pre-emphasis, DC removal, Kaldi's mel banks).

Resampling uses ``soxr`` (the library behind librosa's default ``soxr_hq``): band-limited,
high quality and several times faster than polyphase filtering in scipy.

Usage::

    wav, sr = load_wav("prompt.flac", 24000)        # mono float32 at 24 kHz
    mel = mel_spectrogram(torch.from_numpy(wav))   # (80, frames)
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import librosa
import numpy as np
import soundfile as sf
import soxr
import torch

from .config import FeatureConfig

_F = FeatureConfig()


def load_wav(path: str | Path, sample_rate: int | None = None, normalize: bool = False) -> tuple[np.ndarray, int]:
    """Read any wav/flac/ogg file as mono float32, resampled to ``sample_rate`` if given.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for an unreadable or empty
    one. ``normalize`` scales the peak to 0.95.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"audio file {path} does not exist")
    try:
        wav, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises LibsndfileError/RuntimeError subclasses
        raise ValueError(f"cannot read audio file {path}: {exc}") from exc
    if wav.size == 0:
        raise ValueError(f"audio file {path} contains no samples")
    wav = wav.mean(axis=1)
    if sample_rate is not None and sample_rate != sr:
        wav, sr = resample(wav, sr, sample_rate), sample_rate
    if normalize:
        wav = normalize_peak(wav)
    return wav.astype(np.float32), sr


def resample(wav: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Band-limited resampling with soxr (high quality)."""
    if orig_sr == target_sr:
        return np.asarray(wav, dtype=np.float32)
    return soxr.resample(np.asarray(wav, dtype=np.float32), orig_sr, target_sr, quality="HQ").astype(np.float32)


def normalize_peak(wav: np.ndarray, peak: float = 0.95) -> np.ndarray:
    """Scale so that max |x| = ``peak``; silent input is a ``ValueError``."""
    m = float(np.abs(wav).max()) if wav.size else 0.0
    if m < 1e-5:
        raise ValueError("audio is silent (peak below 1e-5); cannot normalise")
    return (wav * (peak / m)).astype(np.float32)


def trim_silence(wav: np.ndarray, sr: int, top_db: float = 40.0, margin_s: float = 0.05) -> np.ndarray:
    """Cut leading/trailing parts quieter than ``top_db`` below the peak, keeping a small margin."""
    _, (start, end) = librosa.effects.trim(wav, top_db=top_db, frame_length=1024, hop_length=256)
    margin = int(margin_s * sr)
    return wav[max(0, start - margin): min(len(wav), end + margin)]


def _as_batch(wav: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, bool]:
    wav = torch.as_tensor(wav, dtype=torch.float32)
    if wav.dim() not in (1, 2):
        raise ValueError(f"expected a waveform of shape (samples,) or (batch, samples), got {tuple(wav.shape)}")
    return (wav.unsqueeze(0), True) if wav.dim() == 1 else (wav, False)


@functools.lru_cache(maxsize=8)
def mel_filters(sr: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None) -> torch.Tensor:
    """librosa's Slaney-normalised mel filterbank, (n_mels, n_fft//2+1). Cached per parameter set
    (all of them, unlike matcha's cache keyed on fmax only, NOTES.md §6)."""
    return torch.from_numpy(librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)).float()


@functools.lru_cache(maxsize=8)
def mel_band_centres(sr: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None) -> np.ndarray:
    """Centre frequencies (Hz) of :func:`mel_filters`' bands: the Slaney mel scale between fmin and
    fmax (default sr/2), end points dropped."""
    return librosa.mel_frequencies(n_mels + 2, fmin=fmin, fmax=sr / 2 if fmax is None else fmax)[1:-1]


def mel_spectrogram(wav: torch.Tensor | np.ndarray, cfg: FeatureConfig = _F, fmax: float | None = -1.0) -> torch.Tensor:
    """80-bin natural-log mel at 24 kHz, 50 frames/s: the flow's feature (§2.4).

    Reflect-pad (n_fft - hop)/2 per side, STFT without centering, magnitude sqrt(|X|² + 1e-9),
    Slaney mel (fmin 0, fmax 8000 by default; ``fmax=None`` as in GAN training), ln(clamp 1e-5).
    Returns (n_mels, frames) for 1-D input, (batch, n_mels, frames) for 2-D input.
    """
    x, squeeze = _as_batch(wav)
    fmax = cfg.fmax if fmax == -1.0 else fmax
    pad = (cfg.n_fft - cfg.hop_length) // 2
    x = torch.nn.functional.pad(x.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
    spec = torch.stft(x, cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length,
                      window=torch.hann_window(cfg.win_length), center=False, return_complex=True)
    mag = torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + 1e-9)
    mel = mel_filters(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin, fmax) @ mag
    out = torch.log(torch.clamp(mel, min=1e-5))
    return out.squeeze(0) if squeeze else out


def whisper_log_mel(wav: torch.Tensor | np.ndarray, cfg: FeatureConfig = _F) -> torch.Tensor:
    """Whisper's 128-bin log-mel at 16 kHz, 100 frames/s: the speech tokenizer's input (§2.2).

    Centered STFT (n_fft 400, hop 160, Hann), last frame dropped, power spectrum, Slaney mel,
    log10(clamp 1e-10), floor at (max - 8) per utterance, then (x + 4) / 4.
    """
    x, squeeze = _as_batch(wav)
    spec = torch.stft(x, cfg.whisper_n_fft, hop_length=cfg.whisper_hop_length,
                      window=torch.hann_window(cfg.whisper_n_fft), return_complex=True)
    power = spec[..., :-1].abs() ** 2
    mel = mel_filters(cfg.tokenizer_sample_rate, cfg.whisper_n_fft, cfg.whisper_n_mels) @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.amax(dim=(-2, -1), keepdim=True) - 8.0)
    out = (log_spec + 4.0) / 4.0
    return out.squeeze(0) if squeeze else out


def _mel_scale(freq: torch.Tensor | float) -> torch.Tensor:
    return 1127.0 * torch.log1p(torch.as_tensor(freq, dtype=torch.float64) / 700.0)


@functools.lru_cache(maxsize=4)
def kaldi_mel_banks(n_mels: int, padded_window: int, sr: int, low_freq: float = 20.0,
                    high_freq: float = 0.0) -> torch.Tensor:
    """Kaldi's triangular mel banks (float64), (n_mels, padded_window//2 + 1), last column zero.

    Triangles are linear in the mel domain mel(f) = 1127 ln(1 + f/700); ``high_freq <= 0`` means
    Nyquist + high_freq, as in Kaldi.
    """
    nyquist = sr / 2
    high = high_freq if high_freq > 0 else nyquist + high_freq
    n_bins = padded_window // 2
    mel_low, mel_high = _mel_scale(low_freq), _mel_scale(high)
    delta = (mel_high - mel_low) / (n_mels + 1)
    idx = torch.arange(n_mels, dtype=torch.float64).unsqueeze(1)
    left, center, right = mel_low + idx * delta, mel_low + (idx + 1) * delta, mel_low + (idx + 2) * delta
    mel = _mel_scale(torch.arange(n_bins, dtype=torch.float64) * (sr / padded_window)).unsqueeze(0)
    up, down = (mel - left) / (center - left), (right - mel) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)
    return torch.nn.functional.pad(banks, (0, 1))


def kaldi_fbank(wav: torch.Tensor | np.ndarray, cfg: FeatureConfig = _F, mean_norm: bool = True,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Kaldi fbank (80 bins, 25 ms / 10 ms, Povey window, pre-emphasis 0.97, DC removal,
    snip edges, no dither, log power), minus its per-bin mean over time when ``mean_norm``:
    the CAM++ input. Input: 1-D float waveform in [-1, 1] at 16 kHz. Returns (frames, n_mels).

    ``dtype`` float32 follows the official (torchaudio) arithmetic, whose rounding shows in the log
    of near-silent bins (up to 1e-3 away from a float64 computation, NOTES.md §9)."""
    x = torch.as_tensor(wav, dtype=dtype)
    if x.dim() == 2 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 1:
        raise ValueError(f"kaldi_fbank expects one waveform (samples,), got {tuple(x.shape)}")
    sr = cfg.speaker_sample_rate
    win = int(sr * cfg.fbank_frame_length_ms / 1000)
    shift = int(sr * cfg.fbank_frame_shift_ms / 1000)
    if x.numel() < win:
        raise ValueError(f"audio too short for one {cfg.fbank_frame_length_ms} ms frame ({x.numel()} samples)")
    frames = x.unfold(0, win, shift)                                  # snip_edges: whole frames only
    frames = frames - frames.mean(dim=1, keepdim=True)                # remove DC offset
    prev = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)          # x[-1] := x[0]
    frames = frames - 0.97 * prev                                     # pre-emphasis
    frames = frames * torch.hann_window(win, periodic=False, dtype=dtype).pow(0.85)  # Povey
    padded = 1 << math.ceil(math.log2(win))
    power = torch.fft.rfft(frames, n=padded).abs().pow(2)
    energies = power @ kaldi_mel_banks(cfg.fbank_n_mels, padded, sr).to(dtype).T
    feats = torch.log(torch.clamp(energies, min=torch.finfo(torch.float32).eps))
    if mean_norm:
        feats = feats - feats.mean(dim=0, keepdim=True)
    return feats.float()
