"""Training the HiFT vocoder at small scale (paper §2's vocoder stage; NOTES.md §5).

``python -m minicosy.train hift`` (:func:`train_hift`) follows the official HiFi-GAN recipe at
small scale: mel L1 + multi-resolution STFT loss + F0 L1 against a pitch tracker, and a small
multi-period / multi-resolution discriminator (LSGAN + feature matching) after a warm-up.
:func:`griffin_lim` is the classical baseline it is compared with.

Usage::

    hift, log = train_hift("data/corpus", minutes=15, out="data/checkpoints/hift_tiny.pt")
    print(compare_with_griffin_lim(hift, [r["wav"] for r in heldout_audio("data/corpus")]))
"""
from __future__ import annotations

import json
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
from .config import FeatureConfig, get_config
from .data import load_manifest
from .hift import HiFTGenerator, load_hift_state_dict
from .train import (TrainConfig, TrainLog, average_gradients, broadcast_parameters, from_main, is_main_process,
                    load_checkpoint, local_batch, lr_factor, make_optimizer, mean_over_ranks, recipe_parser,
                    save_checkpoint, seed_everything, state_file, write_state)

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


def frame_pattern(wav: torch.Tensor, frame: int = 480, n_fft: int = 128, hop: int = 40) -> torch.Tensor:
    """What repeats every mel frame in a waveform (B, L): its short-time log spectrum (``n_fft``
    samples, ``hop`` apart: ``frame / hop`` analysis frames per mel frame) averaged over the mel
    frames at each position within a frame, minus the mean over positions, (B, n_fft/2+1, frame/hop).
    Speech has next to none; an up-sampling stack driven by frame-rate mels can leave a pattern there
    (a 50 Hz buzz) that the mel loss, whose frames are the mel frames, cannot see."""
    if frame % hop:
        raise ValueError(f"hop {hop} must divide the frame {frame}")
    logmag = stft_magnitude(wav, n_fft, hop, n_fft).log()
    per, n = frame // hop, logmag.shape[-1] // (frame // hop) * (frame // hop)
    folded = logmag[..., :n].reshape(*logmag.shape[:-1], n // per, per).mean(-2)
    return folded - folded.mean(-1, keepdim=True)


def frame_pattern_loss(fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """L1 between the :func:`frame_pattern` of generated and real audio (the training aid of
    ``train hift --buzz-weight``; not in the official recipe)."""
    return F.l1_loss(frame_pattern(fake), frame_pattern(real))


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
               max_steps: int | None = None, state_path: str | Path | None = None, state_minutes: float = 5.0,
               buzz_weight: float = 0.0) -> tuple[HiFTGenerator, TrainLog]:
    """Train HiFT on the corpus' train split: 45·mel L1 + MR-STFT + F0 L1 (Hz/100) throughout, LSGAN
    + 2·feature matching once ``gan_after`` of the time budget has passed; AdamW (0.8, 0.99), warm-up
    + cosine. ``buzz_weight`` > 0 adds that times :func:`frame_pattern_loss` (0, the official recipe,
    only logs it). From scratch or from the generator checkpoint ``init``; on the recordings' mels or on
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
        losses = {"mel": mel_l1(fake, wav), "stft": mr_stft_distance(fake, wav), "f0": F.l1_loss(f0_pred, f0) / 100,
                  "buzz": frame_pattern_loss(fake, wav)}
        g_loss = 45 * losses["mel"] + losses["stft"] + losses["f0"] + buzz_weight * losses["buzz"]
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
                                "buzz_weight": buzz_weight,
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
    p.add_argument("--buzz-weight", type=float, default=0.0,
                   help="weight of the frame-pattern loss against a 50 Hz buzz (0: the official recipe, logged only)")
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
                          utterances=a.utterances, state_path=state_file(a.state, a.out), buzz_weight=a.buzz_weight)
    if not is_main_process():
        return
    for name, m in compare_with_griffin_lim(model, [r["wav"] for r in heldout_audio(a.corpus)]).items():
        print(f"{name:12s} mel L1 {m['mel_l1']:.3f}  MR-STFT {m['mr_stft']:.3f}")
