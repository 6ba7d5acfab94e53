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

Training at small scale (``python -m minicosy.train hift``) and the Griffin-Lim baseline live in
:mod:`minicosy.hift_train`.

Usage::

    hift = load_official_hift("pretrained/hift.pt")         # or HiFTGenerator(cfg.hift)
    speech, source = hift.inference(mel)                    # (B, 480T), (B, 1, 480T)
    speech, source = hift.inference(next_mel, cache_source=source[..., -8 * 480:])  # streaming
    hift.convolutions_in(torch.bfloat16)                    # half-precision convolutions, STFT in float32
    hift = HiFTGenerator.from_checkpoint("data/checkpoints/hift_tiny.pt")   # the tiny trained one
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm

from .config import HiFTConfig
from .train import load_state_dict_checked, model_from_checkpoint, read_torch_file


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
        """The model saved by :func:`~minicosy.hift_train.train_hift` (eval mode)."""
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
