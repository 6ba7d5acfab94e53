"""HiFT vocoder: neural source-filter excitation + iSTFTNet generator (paper §2; NOTES.md §5).

The paper's last stage "reinstates the phases, transforming the Mel spectrum back into" audio
with a pre-trained HiFi-GAN-family vocoder; CosyVoice 2 ships HiFTNet (Neural Source Filter +
iSTFTNet). The data flow of :class:`HiFTGenerator`::

    mel (B, 80, T) ─ F0Predictor ─ f0 (B, T) ─ ×480 nearest ─ SourceModule ─ source (B, 1, 480T)
    mel ─ conv_pre ─┬ 3 × [leaky_relu → ConvTranspose (×8, ×5, ×3) → + source branch → resblocks]
    source ─ STFT ──┘ → leaky_relu(0.01) → conv_post → exp, sin → iSTFT (16/4) → clamp ±0.99

Every parameter name equals the official state-dict key (``manifests/hift.pt.keys.json``), so
:func:`load_official_hift` reads the released ``hift.pt`` strictly. The source is the only random
part: :meth:`HiFTGenerator.decode` is deterministic for a given source, and all draws go through
an optional ``torch.Generator`` in the official order (a generator seeded like
``torch.manual_seed`` reproduces the official outputs on CPU).

Training (``python -m minicosy.train hift``, :func:`train_hift`) follows the official HiFi-GAN
recipe at small scale: mel L1 + multi-resolution STFT loss + F0 L1 against a pitch tracker, and a
small multi-period / multi-resolution discriminator (LSGAN + feature matching) after a warm-up.
:func:`griffin_lim` is the classical baseline it is compared with.

Usage::

    hift = load_official_hift("pretrained/hift.pt")         # or HiFTGenerator(cfg.hift)
    speech, source = hift.inference(mel)                    # (B, 480T), (B, 1, 480T)
    speech, source = hift.inference(next_mel, cache_source=source[..., -8 * 480:])  # streaming
    hift.convolutions_in(torch.bfloat16)                    # half-precision convolutions, STFT in float32
    hift = HiFTGenerator.from_checkpoint("data/checkpoints/hift_tiny.pt")   # the tiny trained one
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import librosa
import numpy as np
import soundfile as sf
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm
from tqdm.auto import tqdm

from .audio import load_wav, mel_spectrogram
from .config import FeatureConfig, HiFTConfig, get_config
from .data import load_manifest
from .train import (TrainConfig, TrainLog, average_gradients, broadcast_parameters, from_main, is_main_process,
                    load_checkpoint, load_state_dict_checked, local_batch, lr_factor, make_optimizer, mean_over_ranks,
                    model_from_checkpoint, read_torch_file, recipe_parser, save_checkpoint, seed_everything,
                    state_file, write_state)


class Snake(nn.Module):
    """Snake activation x + sin²(αx)/α with one trainable α per channel (BigVGAN)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha[None, :, None]
        return x + (1.0 / (alpha + 1e-9)) * torch.sin(x * alpha).pow(2)


class ResBlock(nn.Module):
    """HiFi-GAN residual block: per dilation d, x += conv1(Snake(conv_d(Snake(x)))), 'same' padding."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]):
        super().__init__()

        def conv(dilation: int) -> nn.Module:
            pad = dilation * (kernel_size - 1) // 2
            return weight_norm(nn.Conv1d(channels, channels, kernel_size, dilation=dilation, padding=pad))

        self.convs1 = nn.ModuleList(conv(d) for d in dilations)
        self.convs2 = nn.ModuleList(conv(1) for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for act1, conv1, act2, conv2 in zip(self.activations1, self.convs1, self.activations2, self.convs2):
            x = conv2(act2(conv1(act1(x)))) + x
        return x


class F0Predictor(nn.Module):
    """ConvRNNF0Predictor: 5 × (weight-normed conv k3 + ELU) → Linear → |·|, one f0 per mel frame."""

    def __init__(self, in_channels: int = 80, channels: int = 512, num_layers: int = 5):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers += [weight_norm(nn.Conv1d(in_channels if i == 0 else channels, channels, 3, padding=1)), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, 1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """mel (B, n_mels, T) → non-negative f0 in Hz (B, T)."""
        return self.classifier(self.condnet(mel).transpose(1, 2)).squeeze(-1).abs()


class SourceModule(nn.Module):
    """Harmonic-plus-noise NSF source (SourceModuleHnNSF with SineGen2, the 24 kHz variant).

    For harmonics k·f0, k = 1..H+1, the per-sample phase increment (k·f0/sr) mod 1 gets a random
    initial phase U[0, 1) cycles on its first sample (0 for the fundamental). The increments are
    linearly down-sampled by ``upsample_scale`` (480), summed, scaled back by 480 and linearly
    up-sampled, which gives a smooth phase at frame rate cost. (The down-sampling reads samples
    239/240 of each frame only, so, exactly as in the official code, the initial phase is drawn
    but never reaches the output.) Then sine = α·sin(2π·phase) in voiced samples (f0 > threshold),
    plus Gaussian noise of std σ (voiced) or α/3 (unvoiced), merged into one excitation by
    tanh(Linear(H+1 → 1)).
    """

    def __init__(self, cfg: HiFTConfig, upsample_scale: int):
        super().__init__()
        self.cfg, self.upsample_scale = cfg, upsample_scale
        self.l_linear = nn.Linear(cfg.nb_harmonics + 1, 1)

    def harmonics(self, f0: torch.Tensor,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """f0 (B, L, 1) at the sample rate → (noisy harmonic sines (B, L, H+1), voiced mask (B, L, 1))."""
        cfg = self.cfg
        k = torch.arange(1, cfg.nb_harmonics + 2, device=f0.device, dtype=f0.dtype)
        rad = (f0 * k / cfg.sample_rate) % 1
        initial_phase = torch.rand(f0.shape[0], k.numel(), generator=generator, device=f0.device)
        initial_phase[:, 0] = 0
        rad[:, 0, :] = rad[:, 0, :] + initial_phase
        rad = F.interpolate(rad.transpose(1, 2), scale_factor=1 / self.upsample_scale, mode="linear").transpose(1, 2)
        phase = torch.cumsum(rad, dim=1) * 2 * math.pi
        phase = F.interpolate(phase.transpose(1, 2) * self.upsample_scale, scale_factor=self.upsample_scale,
                              mode="linear").transpose(1, 2)
        sines = torch.sin(phase) * cfg.nsf_alpha
        uv = (f0 > cfg.voiced_threshold).float()
        noise_std = uv * cfg.nsf_sigma + (1 - uv) * cfg.nsf_alpha / 3
        # as official randn_like: sines is a channel-major (non-contiguous) view, so torch draws
        # element by element in that memory order, not with its vectorised contiguous sampler
        noise = noise_std * torch.empty_like(sines).normal_(generator=generator)
        return sines * uv + noise, uv

    def forward(self, f0: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """f0 (B, L, 1) → (excitation (B, L, 1), voiced mask (B, L, 1))."""
        with torch.no_grad():
            sines, uv = self.harmonics(f0, generator)
        # the official module also draws a noise-branch signal that HiFT never uses; drawing it
        # keeps a shared generator in step with the official code from one call to the next
        torch.empty_like(uv).normal_(generator=generator)
        return torch.tanh(self.l_linear(sines)), uv


class HiFTGenerator(nn.Module):
    """HiFTNet generator (NOTES.md §5): mel → f0 → NSF source → up-sampling with source fusion → iSTFT."""

    def __init__(self, cfg: HiFTConfig | None = None):
        super().__init__()
        cfg = cfg or HiFTConfig()
        if not (len(cfg.upsample_rates) == len(cfg.upsample_kernel_sizes) == len(cfg.source_resblock_kernel_sizes)):
            raise ValueError("upsample_rates, upsample_kernel_sizes and source_resblock_kernel_sizes "
                             "need one entry per up-sampling stage")
        self.cfg = cfg
        self.samples_per_frame = math.prod(cfg.upsample_rates) * cfg.istft_hop  # 480 at 24 kHz
        n_bins2 = cfg.istft_n_fft + 2  # real and imaginary parts of n_fft/2 + 1 bins
        stage_ch = [cfg.base_channels // 2 ** (i + 1) for i in range(len(cfg.upsample_rates))]

        self.m_source = SourceModule(cfg, self.samples_per_frame)
        self.conv_pre = weight_norm(nn.Conv1d(cfg.in_channels, cfg.base_channels, 7, padding=3))
        self.ups = nn.ModuleList(
            weight_norm(nn.ConvTranspose1d(2 * ch, ch, k, u, padding=(k - u) // 2))
            for ch, u, k in zip(stage_ch, cfg.upsample_rates, cfg.upsample_kernel_sizes))
        # source STFT frames → stage i resolution: stride = product of the later stages' rates
        self.source_downs = nn.ModuleList()
        for i, ch in enumerate(stage_ch):
            stride = math.prod(cfg.upsample_rates[i + 1:])
            self.source_downs.append(nn.Conv1d(n_bins2, ch, 1) if stride == 1 else
                                     nn.Conv1d(n_bins2, ch, 2 * stride, stride, padding=stride // 2))
        self.source_resblocks = nn.ModuleList(
            ResBlock(ch, k, cfg.source_resblock_dilations) for ch, k in zip(stage_ch, cfg.source_resblock_kernel_sizes))
        self.resblocks = nn.ModuleList(
            ResBlock(ch, k, cfg.resblock_dilations) for ch in stage_ch for k in cfg.resblock_kernel_sizes)
        self.conv_post = weight_norm(nn.Conv1d(stage_ch[-1], n_bins2, 7, padding=3))
        self.f0_predictor = F0Predictor(cfg.in_channels, cfg.f0_channels)
        # periodic Hann, computed in float64 like scipy's get_window("hann", n_fft, fftbins=True)
        window = torch.hann_window(cfg.istft_n_fft, periodic=True, dtype=torch.float64).float()
        self.register_buffer("stft_window", window, persistent=False)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "HiFTGenerator":
        """The model saved by :func:`train_hift` (eval mode)."""
        return model_from_checkpoint(path, lambda mc: cls(HiFTConfig(**{k: tuple(v) if isinstance(v, list) else v
                                                                     for k, v in mc.items()})), _official_keys)

    def convolutions_in(self, dtype: torch.dtype) -> "HiFTGenerator":
        """Run the F0 predictor and the generator's convolutions in ``dtype`` (bfloat16 or float16:
        half the weight and activation traffic); the NSF source, the STFT of the source and the
        iSTFT with its exp/sin stay float32, where the phase and the magnitude's range need it.
        ``torch.float32`` undoes it. Returns the module."""
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"HiFT convolutions run in float32, float16 or bfloat16, got {dtype}")
        self.to(dtype)
        self.m_source.float()
        self.stft_window = self.stft_window.float()
        return self

    @property
    def conv_dtype(self) -> torch.dtype:
        return self.conv_pre.bias.dtype

    # ---- source -------------------------------------------------------------------------------
    def predict_f0(self, mel: torch.Tensor) -> torch.Tensor:
        """mel (B, 80, T) → float32 f0 in Hz (B, T), by the F0 predictor in the convolutions' dtype."""
        return self.f0_predictor(mel.to(self.conv_dtype)).float()

    def f0_to_source(self, f0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Frame-rate f0 (B, T) → excitation (B, 1, T·480): nearest up-sampling, then the NSF source."""
        f0_samples = F.interpolate(f0[:, None], scale_factor=float(self.samples_per_frame), mode="nearest")
        source, _ = self.m_source(f0_samples.transpose(1, 2), generator)
        return source.transpose(1, 2)

    def stft(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Centred STFT (reflect padding) of source (B, 1, L) → real, imag (B, n_fft/2+1, L/hop+1)."""
        n_fft = self.cfg.istft_n_fft
        spec = torch.stft(source.squeeze(1), n_fft, self.cfg.istft_hop, n_fft, window=self.stft_window,
                          return_complex=True)
        return spec.real, spec.imag

    def istft(self, magnitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        """Inverse STFT of magnitude (clipped at 1e2) and phase, (B, n_fft/2+1, F) → (B, hop·(F−1))."""
        magnitude = magnitude.clamp(max=1e2)
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        n_fft = self.cfg.istft_n_fft
        return torch.istft(spec, n_fft, self.cfg.istft_hop, n_fft, window=self.stft_window)

    # ---- generator ----------------------------------------------------------------------------
    def _check_mel(self, mel: torch.Tensor) -> None:
        if mel.dim() != 3 or mel.shape[1] != self.cfg.in_channels or mel.shape[2] < 1:
            raise ValueError(f"mel must be (batch, {self.cfg.in_channels}, frames >= 1), got {tuple(mel.shape)}")

    def decode(self, mel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """Deterministic mel (B, 80, T) + source (B, 1, 480T) → waveform (B, 480T) in [−0.99, 0.99]."""
        self._check_mel(mel)
        expected = (mel.shape[0], 1, mel.shape[2] * self.samples_per_frame)
        if tuple(source.shape) != expected:
            raise ValueError(f"source must be {expected} for mel {tuple(mel.shape)}, got {tuple(source.shape)}")
        real, imag = self.stft(source.float())
        s_stft = torch.cat([real, imag], dim=1).to(self.conv_dtype)

        x = self.conv_pre(mel.to(self.conv_dtype))
        n_kernels = len(self.cfg.resblock_kernel_sizes)
        for i, (up, down, source_block) in enumerate(zip(self.ups, self.source_downs, self.source_resblocks)):
            x = up(F.leaky_relu(x, self.cfg.lrelu_slope))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")  # one more frame: T·120 + 1 = STFT frames
            x = x + source_block(down(s_stft))
            blocks = self.resblocks[i * n_kernels:(i + 1) * n_kernels]
            x = sum(block(x) for block in blocks) / n_kernels

        x = self.conv_post(F.leaky_relu(x)).float()  # default slope 0.01 here, as in the official code
        n_bins = self.cfg.istft_n_fft // 2 + 1
        speech = self.istft(torch.exp(x[:, :n_bins]), torch.sin(x[:, n_bins:]))
        return speech.clamp(-self.cfg.audio_limit, self.cfg.audio_limit)

    def forward(self, mel: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Training path: mel (B, 80, T) → (waveform (B, 480T), predicted f0 (B, T))."""
        self._check_mel(mel)
        f0 = self.predict_f0(mel)
        return self.decode(mel, self.f0_to_source(f0, generator)), f0

    @torch.inference_mode()
    def inference(self, mel: torch.Tensor, cache_source: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """mel (B, 80, T) → (waveform (B, 480T), source (B, 1, 480T)).

        ``cache_source`` (B, 1, L ≤ 480T), the tail of the previous chunk's source, overwrites the
        first L samples of the new source so consecutive streaming chunks stay phase-continuous.
        """
        self._check_mel(mel)
        source = self.f0_to_source(self.predict_f0(mel), generator)
        if cache_source is not None and cache_source.shape[-1] > 0:
            if cache_source.dim() != 3 or cache_source.shape[:2] != source.shape[:2] \
                    or cache_source.shape[2] > source.shape[2]:
                raise ValueError(f"cache_source must be ({source.shape[0]}, 1, <= {source.shape[2]}), "
                                 f"got {tuple(cache_source.shape)}")
            source[:, :, :cache_source.shape[2]] = cache_source
        return self.decode(mel, source), source


class VocoderStream:
    """Streaming mel-to-wav for one request with the official HiFT cache (NOTES.md §3).

    Each non-final chunk is vocoded with the previous chunk's last ``mel_cache_len`` mel frames in
    front and its first ``source_cache_len`` source samples taken from the previous chunk (phase
    continuity); its first ``source_cache_len`` samples are cross-faded with the withheld tail of
    the previous chunk by a Hamming window of twice that length; the last ``source_cache_len``
    samples are withheld for the next chunk. The final chunk emits everything."""

    def __init__(self, hift: HiFTGenerator, mel_cache_len: int = 8, source_cache_len: int = 8 * 480,
                 generator: torch.Generator | None = None) -> None:
        self.hift, self.generator = hift, generator
        self.mel_cache_len, self.source_cache_len = mel_cache_len, source_cache_len
        self.window = torch.hamming_window(2 * source_cache_len, periodic=False, dtype=torch.float64).float()
        self.cache: dict[str, torch.Tensor] | None = None

    def _fade(self, speech: torch.Tensor) -> torch.Tensor:
        n, w = self.source_cache_len, self.window.to(speech)
        speech = speech.clone()
        speech[:, :n] = speech[:, :n] * w[:n] + self.cache["speech"] * w[n:]
        return speech

    def __call__(self, mel: torch.Tensor, finalize: bool) -> torch.Tensor:
        """Waveform (1, samples) for the next mel chunk (1, 80, T) of the request."""
        source = None
        if self.cache is not None:
            mel = torch.cat([self.cache["mel"], mel], dim=2)
            source = self.cache["source"]
        if mel.shape[2] == 0:
            return mel.new_zeros(1, 0)
        speech, new_source = self.hift.inference(mel, source, self.generator)
        if self.cache is not None:
            speech = self._fade(speech)
        if finalize:
            self.cache = None
            return speech
        n = self.source_cache_len
        if speech.shape[1] <= n:
            raise ValueError(f"a streaming chunk must give more than {n} samples, got {speech.shape[1]}")
        self.cache = {"mel": mel[:, :, -self.mel_cache_len:], "source": new_source[:, :, -n:], "speech": speech[:, -n:]}
        return speech[:, :-n]


# ---- official checkpoints -------------------------------------------------------------------------
def _official_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the substring ``generator.`` (HiFiGan training checkpoints, NOTES.md §1) and rename legacy
    weight-norm keys ``weight_g``/``weight_v`` to ``parametrizations.weight.original0``/``original1``."""
    legacy = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}
    renamed = {}
    for key, value in state_dict.items():
        key = key.replace("generator.", "")
        prefix, _, last = key.rpartition(".")
        renamed[f"{prefix}.{legacy[last]}" if last in legacy else key] = value
    return renamed


def _read_state_dict(path_or_state_dict: str | Path | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(path_or_state_dict, dict):
        return _official_keys(path_or_state_dict)
    path = Path(path_or_state_dict)
    if not path.is_file():
        raise FileNotFoundError(f"HiFT checkpoint not found: {path}")
    return _official_keys(read_torch_file(path))


def load_hift_state_dict(model: HiFTGenerator, path_or_state_dict: str | Path | dict[str, torch.Tensor]) -> None:
    """Strictly load an official ``hift.pt`` (path or state dict) into ``model``; on mismatch raise a
    ValueError naming the missing keys, unexpected keys and shape conflicts."""
    state = _read_state_dict(path_or_state_dict)
    load_state_dict_checked(model, state, "HiFT checkpoint")


def load_official_hift(path_or_state_dict: str | Path | dict[str, torch.Tensor],
                       cfg: HiFTConfig | None = None) -> HiFTGenerator:
    """Build a :class:`HiFTGenerator` for an official checkpoint and load it strictly (eval mode).

    Without ``cfg``, the official 24 kHz configuration is used with the widths read from the
    checkpoint (mel bins and base channels from ``conv_pre``, f0-predictor channels from its
    first conv), so both the released model and the reduced golden one load as they are.
    """
    state = _read_state_dict(path_or_state_dict)
    if cfg is None:
        conv_pre = state.get("conv_pre.parametrizations.weight.original1")
        f0_conv = state.get("f0_predictor.condnet.0.parametrizations.weight.original1")
        cfg = HiFTConfig() if conv_pre is None or f0_conv is None else HiFTConfig(
            in_channels=conv_pre.shape[1], base_channels=conv_pre.shape[0], f0_channels=f0_conv.shape[0])
    model = HiFTGenerator(cfg)
    load_hift_state_dict(model, state)
    return model.eval()


# ---- small-scale training -------------------------------------------------------------------------
STFT_RESOLUTIONS = ((1024, 120, 600), (2048, 240, 1200), (512, 50, 240))  # (n_fft, hop, win)
SEGMENT_FRAMES = 32                                                        # 0.64 s training segments


def stft_magnitude(wav: torch.Tensor, n_fft: int, hop: int, win: int) -> torch.Tensor:
    """|STFT| (B, n_fft/2+1, frames) of (B, L), Hann window, floored at 1e-5."""
    spec = torch.stft(wav, n_fft, hop, win, window=torch.hann_window(win, device=wav.device), return_complex=True)
    return spec.abs().clamp(min=1e-5)


def mr_stft_distance(fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Multi-resolution STFT distance (Parallel WaveGAN): mean over resolutions of the spectral
    convergence ‖|Y|−|Ŷ|‖_F/‖|Y|‖_F plus the mean |log|Y| − log|Ŷ||. Both the loss and the metric."""
    total = fake.new_zeros(())
    for n_fft, hop, win in STFT_RESOLUTIONS:
        f, r = stft_magnitude(fake, n_fft, hop, win), stft_magnitude(real, n_fft, hop, win)
        total = total + torch.linalg.norm(r - f) / torch.linalg.norm(r) + (r.log() - f.log()).abs().mean()
    return total / len(STFT_RESOLUTIONS)


def mel_l1(fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """L1 between full-band log mels (fmax None, the official GAN-training mel)."""
    return F.l1_loss(mel_spectrogram(fake, fmax=None), mel_spectrogram(real, fmax=None))


def f0_track(wav: np.ndarray, cfg: FeatureConfig = FeatureConfig(), fmin: float = 60.0, fmax: float = 500.0
             ) -> np.ndarray:
    """F0 target per mel frame (Hz, 0 = unvoiced): YIN (librosa) on frames centred where the mel's
    frames are (480t + 240), voiced where the frame is loud (RMS > 3% of the utterance's maximum)
    and not noise-like (zero-crossing rate < 0.1). YIN instead of pYIN: ~50x faster, no voicing of its own."""
    n = len(wav) // cfg.hop_length
    x = wav[cfg.hop_length // 2:]
    frame = 2 * cfg.hop_length
    f0 = librosa.yin(x, fmin=fmin, fmax=fmax, sr=cfg.sample_rate, frame_length=frame, hop_length=cfg.hop_length)
    rms = librosa.feature.rms(y=x, frame_length=frame, hop_length=cfg.hop_length)[0]
    zcr = librosa.feature.zero_crossing_rate(x, frame_length=frame, hop_length=cfg.hop_length)[0]
    f0 = np.where((rms > 0.03 * rms.max()) & (zcr < 0.1), f0, 0.0)
    return np.pad(f0, (0, max(0, n - len(f0))))[:n].astype(np.float32)


def corpus_f0(corpus_root: str | Path, split: str, utterances: int | None = None, seed: int = 0) -> list[dict]:
    """Manifest records of a split (or a seeded sample of ``utterances`` of them, for a corpus too
    large to track in full) with their F0 targets (:func:`f0_track`), cached per utterance in
    ``<corpus>/cache/f0_<split>.pt``."""
    records = load_manifest(corpus_root, split)
    if utterances is not None and utterances < len(records):
        keep = np.random.default_rng(seed).choice(len(records), utterances, replace=False)
        records = [records[i] for i in sorted(keep)]
    cache = Path(corpus_root) / "cache" / f"f0_{split}.pt"
    f0s = torch.load(cache, weights_only=True) if cache.exists() else {}
    missing = [r for r in records if r["id"] not in f0s]
    if missing:
        for r in tqdm(missing, desc=f"F0 of {split}", disable=not is_main_process() or len(missing) < 100):
            f0s[r["id"]] = torch.from_numpy(f0_track(load_wav(Path(corpus_root) / r["path"])[0]))
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(f0s, cache)
    return [{**r, "f0": f0s[r["id"]]} for r in records]


def random_segments(records: list[dict], corpus_root: str | Path, batch_size: int, rng: np.random.Generator,
                    frames: int = SEGMENT_FRAMES, hop: int = 480, input_mels: dict[str, torch.Tensor] | None = None):
    """Endless batches (wav (B, frames·480), mel (B, 80, frames), f0 (B, frames)) of random
    frame-aligned segments; the mel is the flow's 8 kHz mel of the segment, i.e. what HiFT receives
    in CosyVoice 2, or the same frames of ``input_mels[id]`` (the flow's own ground-truth-aligned
    mels, :func:`~minicosy.flow.gta_mels`)."""
    def length(r: dict) -> int:
        return len(r["f0"]) if input_mels is None else min(len(r["f0"]), input_mels[r["id"]].shape[1])

    usable = [r for r in records if length(r) >= frames]
    while True:
        wavs, f0s, mels = [], [], []
        for i in rng.integers(len(usable), size=batch_size):
            r = usable[i]
            start = int(rng.integers(length(r) - frames + 1))
            wav, _ = sf.read(str(Path(corpus_root) / r["path"]), start=start * hop, stop=(start + frames) * hop,
                             dtype="float32")
            wavs.append(torch.from_numpy(wav))
            f0s.append(r["f0"][start:start + frames].float())
            if input_mels is not None:
                mels.append(input_mels[r["id"]][:, start:start + frames].float())
        wav = torch.stack(wavs)
        yield wav, mel_spectrogram(wav) if input_mels is None else torch.stack(mels), torch.stack(f0s)


def _conv_stack(x: torch.Tensor, convs: nn.ModuleList, post: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A discriminator branch: leaky-ReLU conv layers then a score conv; returns the flattened
    scores and every layer's output (for the feature-matching loss)."""
    feats = []
    for conv in convs:
        x = F.leaky_relu(conv(x), 0.1)
        feats.append(x)
    x = post(x)
    return x.flatten(1), feats + [x]


class PeriodDiscriminator(nn.Module):
    """HiFi-GAN's MPD branch: the waveform folded into ``period`` columns, 2-D convs along time."""

    def __init__(self, period: int, channels: tuple[int, ...] = (8, 16, 32)):
        super().__init__()
        self.period = period
        chs = (1, *channels)
        self.convs = nn.ModuleList(weight_norm(nn.Conv2d(a, b, (5, 1), (3, 1), padding=(2, 0)))
                                   for a, b in zip(chs, chs[1:]))
        self.post = weight_norm(nn.Conv2d(chs[-1], 1, (3, 1), padding=(1, 0)))

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = F.pad(wav, (0, -wav.shape[-1] % self.period), mode="reflect")
        return _conv_stack(x.view(wav.shape[0], 1, -1, self.period), self.convs, self.post)


class ResolutionDiscriminator(nn.Module):
    """UnivNet's MRD branch: 2-D convs over the log-magnitude spectrogram (B, 1, bins, frames) at one
    STFT resolution."""

    def __init__(self, n_fft: int, hop: int, win: int, channels: int = 8):
        super().__init__()
        self.resolution = (n_fft, hop, win)
        chs = (1, channels, channels, channels)   # 9 bins x 3 frames kernels, frequency strided by 2
        self.convs = nn.ModuleList([*(weight_norm(nn.Conv2d(a, b, (9, 3), (2, 1), padding=(4, 1)))
                                      for a, b in zip(chs, chs[1:])),
                                    weight_norm(nn.Conv2d(channels, channels, 3, padding=1))])
        self.post = weight_norm(nn.Conv2d(channels, 1, 3, padding=1))

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return _conv_stack(stft_magnitude(wav, *self.resolution).log().unsqueeze(1), self.convs, self.post)


class Discriminator(nn.Module):
    """Multi-period (2, 3, 5, 7, 11) + multi-resolution discriminator, small widths."""

    def __init__(self, periods: tuple[int, ...] = (2, 3, 5, 7, 11)):
        super().__init__()
        self.branches = nn.ModuleList([*(PeriodDiscriminator(p) for p in periods),
                                       *(ResolutionDiscriminator(*r) for r in STFT_RESOLUTIONS)])

    def forward(self, wav: torch.Tensor) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        return [branch(wav) for branch in self.branches]


def discriminator_loss(real: list, fake: list) -> torch.Tensor:
    """LSGAN: real scores pulled to 1, generated ones to 0."""
    return sum(((r - 1) ** 2).mean() + (f ** 2).mean() for (r, _), (f, _) in zip(real, fake))


def generator_adversarial_loss(real: list, fake: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(LSGAN generator loss, feature-matching L1 against the real features)."""
    adv = sum(((f - 1) ** 2).mean() for f, _ in fake)
    fm = sum(F.l1_loss(b, a.detach()) for (_, fa), (_, fb) in zip(real, fake) for a, b in zip(fa, fb))
    return adv, fm


def train_hift(corpus_root: str | Path = "data/corpus", preset: str = "tiny", minutes: float = 15.0,
               gan_after: float = 0.5, out: str | Path | None = None, batch_size: int = 8, seed: int = 0,
               threads: int = 2, init: str | Path | None = None, input_mels: dict[str, torch.Tensor] | None = None,
               input_name: str = "flow mel (fmax 8000)", utterances: int | None = None,
               max_steps: int | None = None, state_path: str | Path | None = None, state_minutes: float = 5.0
               ) -> tuple[HiFTGenerator, TrainLog]:
    """Train HiFT on the corpus' train split: 45·mel L1 + MR-STFT + F0 L1 (Hz/100) throughout, LSGAN
    + 2·feature matching once ``gan_after`` of the time budget has passed; AdamW (0.8, 0.99), warm-up
    + cosine. From scratch or from the generator checkpoint ``init``; on the recordings' mels or on
    ``input_mels`` (per utterance id, e.g. the flow's ground-truth-aligned mels; ``input_name`` goes
    on the card); on all train utterances or a seeded sample of ``utterances``; for ``minutes``
    or ``max_steps``, whichever ends first (the schedule and the discriminators' start follow it).
    Saves the generator (float16) with its loss curve.

    With ``state_path``, both networks, both optimisers, the step, the clock, the loss curve and the
    random states (segment draws, the source's noise) are written there every ``state_minutes``; the
    same call started again resumes from it and ends where one uninterrupted run would.

    Under ``torchrun`` each rank takes its share of every step's batches and the two networks'
    gradients are averaged over ranks by hand (:func:`~minicosy.train.average_gradients`: the
    discriminator runs several times per step, which DistributedDataParallel's hooks do not allow)."""
    seed_everything(seed)
    torch.set_num_threads(threads)
    records = corpus_f0(corpus_root, "train", utterances, seed)
    gen, disc = HiFTGenerator(get_config(preset).hift), Discriminator()
    if init is not None:
        load_hift_state_dict(gen, load_checkpoint(init)["state_dict"])
    broadcast_parameters(gen, disc)
    tcfg = TrainConfig(lr=1e-3, betas=(0.8, 0.99), max_minutes=minutes, warmup_steps=100, seed=seed,
                       threads=threads, grad_clip=10.0, max_steps=max_steps or TrainConfig.max_steps,
                       state_path=None if state_path is None else str(state_path), state_minutes=state_minutes)
    opt_g, opt_d = make_optimizer(gen, tcfg), make_optimizer(disc, tcfg)
    parts = {"generator": gen, "discriminator": disc, "opt_g": opt_g, "opt_d": opt_d}
    rng, state = np.random.default_rng(seed), None if state_path is None else Path(state_path)
    log, start, step = TrainLog(extra={"gan_from_step": None}), time.time(), 0
    if state is not None and state.exists():           # resume: the clock, the schedule and the draws go on
        saved = torch.load(state, map_location="cpu", weights_only=True)
        for key, part in parts.items():
            part.load_state_dict(saved[key])
        step, log, start = saved["step"], TrainLog(**saved["log"]), start - saved["elapsed"]
        rng.bit_generator.state = json.loads(saved["segment_rng"])
        torch.set_rng_state(saved["torch_rng"])
    batches = random_segments(records, corpus_root, batch_size, rng, input_mels=input_mels)
    bar = tqdm(desc="HiFT", unit="step", disable=not is_main_process(), initial=step)
    next_save = time.time() - start + state_minutes * 60
    gen.train()
    while (progress := from_main(max(step / tcfg.max_steps, (time.time() - start) / (60 * minutes)))[0]) < 1.0:
        if state is not None and is_main_process() and time.time() - start >= next_save:
            write_state(state, {**{k: p.state_dict() for k, p in parts.items()}, "step": step, "log": asdict(log),
                                "elapsed": time.time() - start, "segment_rng": json.dumps(rng.bit_generator.state),
                                "torch_rng": torch.get_rng_state()})
            next_save = time.time() - start + state_minutes * 60
        for opt in (opt_g, opt_d):
            for group in opt.param_groups:
                group["lr"] = tcfg.lr * lr_factor(step, progress, tcfg)
        wav, mel, f0 = local_batch(batches)
        fake, f0_pred = gen(mel)
        gan = progress >= gan_after
        if gan:
            log.extra["gan_from_step"] = log.extra["gan_from_step"] or step
            d_loss = discriminator_loss(disc(wav), disc(fake.detach()))
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            average_gradients(disc)
            torch.nn.utils.clip_grad_norm_(disc.parameters(), tcfg.grad_clip)
            opt_d.step()
        losses = {"mel": mel_l1(fake, wav), "stft": mr_stft_distance(fake, wav), "f0": F.l1_loss(f0_pred, f0) / 100}
        g_loss = 45 * losses["mel"] + losses["stft"] + losses["f0"]
        if gan:
            with torch.no_grad():
                real_out = disc(wav)
            losses["adv"], losses["fm"] = generator_adversarial_loss(real_out, disc(fake))
            g_loss = g_loss + losses["adv"] + 2 * losses["fm"]
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        average_gradients(gen)
        torch.nn.utils.clip_grad_norm_(gen.parameters(), tcfg.grad_clip)
        opt_g.step()
        if step % tcfg.log_every == 0:
            log.steps.append(step)
            log.losses.append(round(mean_over_ranks(g_loss.detach().clone()).item(), 4))
            for k, v in losses.items():
                log.extra.setdefault(k, []).append(round(mean_over_ranks(v.detach().clone()).item(), 4))
            bar.set_postfix({k: f"{v.item():.3f}" for k, v in losses.items()})
        bar.update(1)
        step += 1
    bar.close()
    gen.eval()
    log.seconds = round(time.time() - start, 1)
    if state is not None and is_main_process() and state.exists():
        state.unlink()                                  # finished: nothing left to resume
    if out is not None:
        save_checkpoint(out, gen, asdict(gen.cfg), tcfg, log, steps=step,
                        recipe={"segment_frames": SEGMENT_FRAMES, "batch_size": batch_size, "gan_after": gan_after,
                                "input_mel": input_name, "init": None if init is None else str(init), "loss_mel": "fmax None",
                                "f0": "librosa.yin + RMS/ZCR voicing", "utterances": len(records)})
    return gen, log


# ---- evaluation against the classical baseline ----------------------------------------------------
def griffin_lim(mel: torch.Tensor, n_iter: int = 32, cfg: FeatureConfig = FeatureConfig()) -> torch.Tensor:
    """Baseline vocoder for a flow mel (80, T): non-negative least-squares inversion of the mel
    filterbank (librosa), then Griffin-Lim phase (``n_iter`` iterations, fixed random start); shifted
    to the mel's frame centres (480t + 240) and cut to 480T samples."""
    mag = librosa.feature.inverse.mel_to_stft(mel.exp().numpy(), sr=cfg.sample_rate, n_fft=cfg.n_fft, power=1.0,
                                              fmin=cfg.fmin, fmax=cfg.fmax)
    wav = librosa.griffinlim(mag, n_iter=n_iter, hop_length=cfg.hop_length, win_length=cfg.win_length,
                             center=True, random_state=0)
    n = mel.shape[-1] * cfg.hop_length
    wav = np.pad(wav, (cfg.hop_length // 2, 0))[:n]
    return torch.from_numpy(np.pad(wav, (0, n - len(wav))).astype(np.float32))


@torch.no_grad()
def compare_with_griffin_lim(model: HiFTGenerator, wavs: list[np.ndarray], seed: int = 0) -> dict[str, dict[str, float]]:
    """Mean mel L1 and MR-STFT distance to the ground truth of HiFT and Griffin-Lim, both vocoding
    the flow mel of each 24 kHz waveform in ``wavs``."""
    scores: dict[str, dict[str, list[float]]] = {"hift": {}, "griffin_lim": {}}
    g = torch.Generator().manual_seed(seed)
    for wav in wavs:
        real = torch.from_numpy(wav[: len(wav) // 480 * 480])
        mel = mel_spectrogram(real)
        for name, fake in (("hift", model.inference(mel[None], generator=g)[0][0]), ("griffin_lim", griffin_lim(mel))):
            scores[name].setdefault("mel_l1", []).append(mel_l1(fake[None], real[None]).item())
            scores[name].setdefault("mr_stft", []).append(mr_stft_distance(fake[None], real[None]).item())
    return {name: {k: round(float(np.mean(v)), 4) for k, v in s.items()} for name, s in scores.items()}


def heldout_audio(corpus_root: str | Path = "data/corpus", n: int = 12, max_seconds: float = 4.0,
                  seed: int = 0) -> list[dict]:
    """``n`` seeded test + held-out-voice records, each with its waveform cut to ``max_seconds``."""
    records = load_manifest(corpus_root, "test") + load_manifest(corpus_root, "heldout")
    picked = [records[i] for i in np.random.default_rng(seed).choice(len(records), n, replace=False)]
    return [{**r, "wav": load_wav(Path(corpus_root) / r["path"])[0][: int(max_seconds * 24000)]} for r in picked]


def train_main(argv: list[str] | None = None) -> None:
    """``python -m minicosy.train hift [--minutes 15] [--out PATH]``: train, then print HiFT vs
    Griffin-Lim on held-out audio."""
    p = recipe_parser("hift", 15.0, "data/checkpoints/hift_tiny.pt")
    p.add_argument("--gan-after", type=float, default=0.5, help="share of the budget before the discriminator starts")
    p.add_argument("--init", help="start from this HiFT checkpoint's weights (fine-tuning) instead of at random")
    p.add_argument("--gta-flow", help="train on this flow checkpoint's ground-truth-aligned mels of the train "
                                      "split instead of the recordings' mels")
    p.add_argument("--tokenizer", default="data/checkpoints/speech_tokenizer_fsq.pt", help="(with --gta-flow)")
    p.add_argument("--speaker-model", default="data/checkpoints/campplus_tiny.pt", help="(with --gta-flow)")
    p.add_argument("--utterances", type=int, help="train on a seeded sample of this many train utterances (their "
                                                   "F0 is tracked once and cached): for a large corpus")
    a = p.parse_args(argv)
    mels, name = None, "flow mel (fmax 8000)"
    if a.gta_flow:
        from .flow import gta_mels   # a declared component dependency (tests/test_packaging.py)
        mels = gta_mels(a.corpus, a.gta_flow, a.tokenizer, a.speaker_model)
        name = f"ground-truth-aligned mels of {a.gta_flow} (train split; prompt: the next utterance of the voice)"
    model, _ = train_hift(a.corpus, minutes=a.minutes, gan_after=a.gan_after, out=a.out, seed=a.seed,
                          threads=a.threads, init=a.init, input_mels=mels, input_name=name,
                          utterances=a.utterances, state_path=state_file(a.state, a.out))
    if not is_main_process():
        return
    for name, m in compare_with_griffin_lim(model, [r["wav"] for r in heldout_audio(a.corpus)]).items():
        print(f"{name:12s} mel L1 {m['mel_l1']:.3f}  MR-STFT {m['mr_stft']:.3f}")
