"""The supervised semantic speech tokenizer (§2.2, Fig. 1a): an ASR model with an FSQ bottleneck.

16 kHz audio → Whisper log-mel (128 bins, 100 Hz) → two stride-2 convolutions (25 Hz) →
Encoder1 (transformer blocks with rotary position embedding and an FSMN memory branch, as the
official speech_tokenizer_v2 builds them) → FSQ (eqs. 1-2) → Encoder2 → ASR head.

The paper's ASR decoder is SenseVoice-Large's; at minicosy's scale the head is a **CTC classifier
over reading units** (blank = 0), phonetic in every language: English ARPAbet phones (CMU
dictionary), Mandarin pinyin initials and tone-numbered finals, Japanese kana of the reading,
Korean jamo (:func:`transcript`). With 1.5 h of audio, a CTC over ~2000 written Han characters does
not leave the all-blank plateau in minutes of CPU training, and one over English letters learns the
training sentences' spellings by heart; reading units are few and frequent, and make the tokens
carry *what is said* (how it sounds), which is the point of §2.2. Training perturbs tempo and
vocal-tract length (:func:`augment`; SpecAugment's masks optionally) so that 13 voices generalise
to new ones. Only conv + Encoder1 + FSQ are needed to tokenise; Encoder2 + head exist for training and
for the ASR reward (§2.8).

Front end and length rule (:func:`tokenizer_mel`, NOTES.md §6): a waveform of n samples at 16 kHz
gives ``n // 160`` Whisper frames T and ``((T - 1) // 2) // 2 + 1 = ceil(T / 4)`` tokens. The
official front end computes the log-mel of the waveform as it is; minicosy's tiny tokenizers were
trained on waveforms zero-padded to whole tokens (640 samples), and keep that rule
(``SpeechTokenizerConfig.pad_to_tokens``, on in the tiny preset): exactly ``ceil(n / 640)`` tokens.
The official ONNX file (:class:`OnnxSpeechTokenizer`) follows the official rule.

Usage::

    tok = SpeechTokenizer.from_checkpoint("data/checkpoints/speech_tokenizer_fsq.pt")
    codes = tok.tokenize(wav, sr)                 # LongTensor (tokens,) in [0, 6561)
    out = tok(mel, mel_lengths)                   # pre-/post-quantisation features, logits
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .audio import load_wav, mel_band_centres, resample, whisper_log_mel
from .config import FeatureConfig, SpeechTokenizerConfig, get_config
from .data import checkpoint_cache, feature_cache, load_manifest
from .fsq import FSQ, VectorQuantizer, bounded_round, digits_to_codes
from .textnorm import english_phones, transcript  # noqa: F401  (reading units; re-exported here)
from .train import (TrainConfig, model_from_checkpoint, onnx_session, recipe_parser, save_checkpoint, seed_everything,
                    state_file, train_loop)

HOP = 160            # Whisper hop at 16 kHz
SAMPLES_PER_TOKEN = 4 * HOP


def num_tokens(num_samples: int, pad_to_tokens: bool = True) -> int:
    """Tokens for a 16 kHz waveform of ``num_samples``: padded to whole tokens, ceil(n / 640) (25 per
    second); as the official front end does it, ceil((n // 160) / 4)."""
    return math.ceil(num_samples / SAMPLES_PER_TOKEN) if pad_to_tokens else math.ceil(num_samples // HOP / 4)


def pad_waveform(wav: np.ndarray) -> np.ndarray:
    """Zero-pad a 16 kHz waveform to whole tokens (a multiple of 640 samples): the tiny recipe's rule."""
    return np.pad(wav, (0, num_tokens(wav.size) * SAMPLES_PER_TOKEN - wav.size))


def tokenizer_mel(wav: np.ndarray | torch.Tensor, sr: int, pad_to_tokens: bool, resampling: str = "soxr") -> torch.Tensor:
    """The tokenizer's input (1, 128, T) for one waveform: resampled to 16 kHz (``resampling``, see
    :func:`~minicosy.audio.resample`), zero-padded to whole tokens if ``pad_to_tokens``, Whisper log-mel.
    Empty, silent or sub-frame audio is a ``ValueError``."""
    wav = resample(np.asarray(wav, dtype=np.float32).reshape(-1), sr, 16000, resampling)
    if wav.size < HOP or float(np.abs(wav).max()) < 1e-5:
        raise ValueError(f"cannot tokenise empty, silent or too short audio ({wav.size} samples at 16 kHz)")
    return whisper_log_mel(torch.from_numpy(pad_waveform(wav) if pad_to_tokens else wav)).unsqueeze(0)


def rotary(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (RoPE) over the last dim of (B, heads, T, head_dim)."""
    half = x.shape[-1] // 2
    freqs = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = torch.arange(x.shape[-2], device=x.device, dtype=torch.float32)[:, None] * freqs
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class FSMNAttention(nn.Module):
    """Multi-head self-attention with RoPE on q/k, plus an FSMN memory: a depthwise convolution
    over the values added to the attention output (official v2 tokenizer structure)."""

    def __init__(self, dim: int, heads: int, fsmn_kernel: int):
        super().__init__()
        self.heads = heads
        self.query, self.key = nn.Linear(dim, dim), nn.Linear(dim, dim, bias=False)
        self.value, self.out = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.fsmn_block = nn.Conv1d(dim, dim, fsmn_kernel, padding=fsmn_kernel // 2, groups=dim, bias=False)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        keep = (~pad).unsqueeze(-1).float()
        q, k, v = (f(x).view(b, t, self.heads, -1).transpose(1, 2) for f in (self.query, self.key, self.value))
        attn = F.scaled_dot_product_attention(rotary(q), rotary(k), v, attn_mask=~pad[:, None, None, :])
        attn = attn.transpose(1, 2).reshape(b, t, d)
        v_seq = v.transpose(1, 2).reshape(b, t, d) * keep
        memory = (self.fsmn_block(v_seq.transpose(1, 2)).transpose(1, 2) + v_seq) * keep
        return self.out(attn) + memory


class Block(nn.Module):
    """Pre-norm transformer block: FSMN attention and a GELU MLP."""

    def __init__(self, dim: int, heads: int, fsmn_kernel: int):
        super().__init__()
        self.attn_ln, self.attn = nn.LayerNorm(dim), FSMNAttention(dim, heads, fsmn_kernel)
        self.mlp_ln = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_ln(x), pad)
        return x + self.mlp(self.mlp_ln(x))


class SpeechTokenizer(nn.Module):
    """conv ×2 → Encoder1 → FSQ (or VQ, the Table 4 baseline) → Encoder2 → CTC head."""

    def __init__(self, cfg: SpeechTokenizerConfig, vocab: list[str], quantizer: str = "fsq"):
        super().__init__()
        if quantizer not in ("fsq", "vq"):
            raise ValueError(f"quantizer must be 'fsq' or 'vq', got {quantizer!r}")
        d = cfg.d_model
        self.cfg, self.vocab, self.quantizer_kind = cfg, list(vocab), quantizer
        self.conv1 = nn.Conv1d(cfg.n_mels, d, 3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(d, d, 3, stride=2, padding=1)
        self.encoder1 = nn.ModuleList(Block(d, cfg.n_heads, cfg.fsmn_kernel) for _ in range(cfg.encoder1_layers))
        # The official model feeds H to Proj_down as it is. The tiny preset normalises it first
        # (cfg.quant_layernorm): that keeps K·tanh out of saturation, without which the bounded
        # rounding's gradient vanishes and the bottleneck collapses to a few codes at this scale.
        self.ln_quant = nn.LayerNorm(d) if cfg.quant_layernorm else nn.Identity()
        self.quantizer = (FSQ(d, cfg.fsq_levels, cfg.fsq_dim) if quantizer == "fsq"
                          else VectorQuantizer(d, cfg.vq_codebook_size, cfg.fsq_dim))
        self.encoder2 = nn.ModuleList(Block(d, cfg.n_heads, cfg.fsmn_kernel) for _ in range(cfg.encoder2_layers))
        self.ln_post = nn.LayerNorm(d)
        self.ctc_head = nn.Linear(d, len(self.vocab) + 1)          # id 0 = CTC blank

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    @staticmethod
    def token_lengths(mel_lengths: torch.Tensor) -> torch.Tensor:
        """Frames after the two stride-2 convolutions (kernel 3, padding 1): ceil(ceil(T/2)/2)."""
        return ((mel_lengths - 1) // 2) // 2 + 1

    def encode(self, mel: torch.Tensor, mel_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder1 output H (B, T', d) before quantisation, and the padding mask (True = pad)."""
        return encode_frames(self.conv1, self.conv2, self.encoder1, mel, mel_lengths)

    def forward(self, mel: torch.Tensor, mel_lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything §2.2 and the notebooks look at: ``pre`` (Encoder1 output), ``codes``,
        ``post`` (Proj_up of the quantised digits), CTC ``log_probs``, ``lengths``, ``aux_loss``."""
        pre, pad = self.encode(mel, mel_lengths)
        post, codes, aux = self.quantizer(self.ln_quant(pre))
        x = post
        for block in self.encoder2:
            x = block(x, pad)
        log_probs = self.ctc_head(self.ln_post(x)).log_softmax(-1)
        return {"pre": pre, "post": post, "codes": codes, "log_probs": log_probs, "pad": pad,
                "lengths": (~pad).sum(-1), "aux_loss": aux}

    def asr_log_probs(self, post: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """Encoder2 + head on given quantised features (the ASR reward of §2.8, eq. 15)."""
        for block in self.encoder2:
            post = block(post, pad)
        return self.ctc_head(self.ln_post(post)).log_softmax(-1)

    @torch.no_grad()
    def tokenize(self, wav: np.ndarray | torch.Tensor, sr: int) -> torch.Tensor:
        """Speech tokens of one waveform, 25 per second (front end and length rule: module docstring)."""
        mel = tokenizer_mel(wav, sr, self.cfg.pad_to_tokens)
        pre, _ = self.encode(mel, torch.tensor([mel.shape[-1]]))
        return self.quantizer(self.ln_quant(pre))[1][0]

    @torch.no_grad()
    def read_units(self, wav: np.ndarray | torch.Tensor, sr: int) -> list[str]:
        """The reading units the ASR head hears in one waveform, through the quantised tokens."""
        mel = tokenizer_mel(wav, sr, self.cfg.pad_to_tokens)
        out = self(mel, torch.tensor([mel.shape[-1]]))
        return self.greedy_transcripts(out["log_probs"], out["lengths"])[0]

    def greedy_transcripts(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[str]]:
        """CTC greedy decoding: best id per frame, merge repeats, drop blanks; lists of units."""
        best = log_probs.argmax(-1)
        out = []
        for row, n in zip(best, lengths):
            ids = torch.unique_consecutive(row[:n])
            out.append([self.vocab[i - 1] for i in ids.tolist() if i > 0])
        return out

    def model_config(self) -> dict:
        return {"cfg": asdict(self.cfg), "vocab": self.vocab, "quantizer": self.quantizer_kind}

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "SpeechTokenizer":
        """A trained tokenizer; checkpoints written before ``pad_to_tokens`` existed were all trained
        on padded waveforms, so that is what a config without the field means."""
        return model_from_checkpoint(path, lambda mc: cls(SpeechTokenizerConfig(**{"pad_to_tokens": True, **mc["cfg"]}),
                                                          mc["vocab"], mc["quantizer"]))


def encode_frames(conv1: nn.Module, conv2: nn.Module, blocks: nn.ModuleList, mel: torch.Tensor,
                  mel_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """conv → GELU → conv → GELU (100 → 25 Hz) → Encoder1 blocks: H (B, T', d) and the padding mask
    (True = pad). A function of the modules so that the official-layout export can hold them under
    the official file's names (:func:`export_onnx`)."""
    x = F.gelu(conv2(F.gelu(conv1(mel)))).transpose(1, 2)
    lengths = SpeechTokenizer.token_lengths(mel_lengths)
    pad = torch.arange(x.shape[1], device=x.device)[None, :] >= lengths[:, None]
    for block in blocks:
        x = block(x, pad)
    return x, pad


# ---------------------------------------------------------------------------------------------
# Training on the corpus (§4.1 at small scale): CTC over reading units, FSQ or VQ bottleneck.

def unit_error_rate(references: list[list[str]], hypotheses: list[list[str]]) -> float:
    """Edit distance over reading units / reference units, pooled over utterances."""
    import jiwer

    return float(jiwer.wer([" ".join(r) for r in references], [" ".join(h) if h else "" for h in hypotheses]))


def load_features(corpus_root: str | Path, split: str) -> list[dict]:
    """Manifest records of a split with their 16 kHz Whisper log-mels (cached beside the corpus), of
    waveforms padded to whole tokens (the tiny recipe's ``pad_to_tokens`` rule)."""
    records = load_manifest(corpus_root, split)
    mels = feature_cache(corpus_root, f"whisper_mel_{split}", records, lambda r: whisper_log_mel(
        torch.from_numpy(pad_waveform(load_wav(Path(corpus_root) / r["path"], 16000)[0]))).half())
    return [{**r, "mel": mels[r["id"]]} for r in records]


def build_vocab(records: list[dict]) -> list[str]:
    """Every reading unit of the training transcripts, sorted (ids 1.. ; 0 is the CTC blank)."""
    return sorted({u for r in records for u in transcript(r["text"], r["lang"])})


def unit_ids(text: str, lang: str, vocab: list[str]) -> list[int]:
    """The CTC targets of a transcript: its reading units as ids of ``vocab`` (1-based; 0 is the
    blank), units outside ``vocab`` dropped."""
    index = {u: i + 1 for i, u in enumerate(vocab)}
    return [index[u] for u in transcript(text, lang) if u in index]


def augment(mel: torch.Tensor, lengths: torch.Tensor, rng: np.random.Generator,
            tempo: tuple[float, float] = (0.85, 1.15), warp: tuple[float, float] = (0.85, 1.18),
            freq_masks: int = 0, freq_width: int = 16, time_masks: int = 0, time_share: float = 0.05
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """A training-time perturbation of a padded batch of Whisper log-mels (B, n_mels, T) with their
    ``lengths``, drawn per utterance from ``rng``, so that the tokenizer hears more voices and rates
    than the corpus' 13 and cannot learn them by heart:

    * tempo: the time axis resampled by a factor in ``tempo`` (speed perturbation without pitch);
    * vocal-tract length: the frequency axis warped, band ``f`` taking the energy at ``f / α``,
      α in ``warp`` (VTLP; α > 1 sounds like a shorter vocal tract: higher formants);
    * SpecAugment (off by default): ``freq_masks`` bands of up to ``freq_width`` bins and
      ``time_masks`` spans of up to ``time_share`` of the frames set to the utterance's floor.

    After 10 CPU-minutes (1 thread, 30 s batches) the unit error on dev/test sentences and on the
    held-out voices was 0.355 / 0.537 without augmentation, 0.371 / 0.448 with tempo and VTLP,
    0.658 / 0.675 with two masks of each kind as well: at this budget the masks slow learning more
    than they regularise, so the recipe warps only (``--spec-augment`` adds the masks).

    Both warps are one bilinear ``grid_sample`` on the batch's device; returns the new batch and
    lengths (zero-padded)."""
    b, n_mels, frames = mel.shape
    dev, old_lengths = mel.device, lengths.cpu().numpy()
    rate, alpha = rng.uniform(*tempo, size=b), rng.uniform(*warp, size=b)
    new_lengths = np.maximum(4, np.round(old_lengths / rate)).astype(int)
    out_frames = int(new_lengths.max())
    src_t = np.minimum(np.arange(out_frames)[None, :] * rate[:, None], (old_lengths - 1)[:, None])
    centres = mel_band_centres(FeatureConfig().tokenizer_sample_rate, n_mels)
    src_f = np.stack([np.interp(centres / a, centres, np.arange(n_mels)) for a in alpha])

    def tensor(x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(x, device=dev)

    def spans(positions: torch.Tensor, start: np.ndarray, width: np.ndarray) -> torch.Tensor:
        return (positions[None] >= tensor(start)[:, None]) & (positions[None] < tensor(start + width)[:, None])

    gx = tensor(2 * src_t / max(frames - 1, 1) - 1).float()[:, None, :].expand(b, n_mels, out_frames)
    gy = tensor(2 * src_f / (n_mels - 1) - 1).float()[:, :, None].expand(b, n_mels, out_frames)
    out = F.grid_sample(mel[:, None].float(), torch.stack([gx, gy], -1), align_corners=True)[:, 0]
    t, bins = torch.arange(out_frames, device=dev), torch.arange(n_mels, device=dev)
    valid = t[None, :] < tensor(new_lengths)[:, None]                                  # (B, T')
    floor = out.masked_fill(~valid[:, None], float("inf")).amin(dim=(1, 2), keepdim=True)
    masked = torch.zeros(b, n_mels, out_frames, dtype=torch.bool, device=dev)
    for _ in range(freq_masks):
        width = rng.integers(freq_width + 1, size=b)
        masked |= spans(bins, rng.integers(n_mels - width + 1), width)[:, :, None]
    for _ in range(time_masks):
        width = (rng.random(b) * (time_share * new_lengths + 1)).astype(int)
        masked |= spans(t, (rng.random(b) * (new_lengths - width + 1)).astype(int), width)[:, None, :]
    out = torch.where(masked, floor, out) * valid[:, None]
    return out, tensor(new_lengths).to(lengths.dtype)


def collate(items: list[dict], vocab: list[str]) -> dict[str, torch.Tensor]:
    """Pad mels to the longest item; targets as concatenated unit ids (unknown units dropped)."""
    lengths = torch.tensor([it["mel"].shape[-1] for it in items])
    mel = torch.zeros(len(items), items[0]["mel"].shape[0], int(lengths.max()))
    for i, it in enumerate(items):
        mel[i, :, : lengths[i]] = it["mel"].float()
    targets = [torch.tensor(unit_ids(it["text"], it["lang"], vocab), dtype=torch.long) for it in items]
    return {"mel": mel, "mel_lengths": lengths, "targets": torch.cat(targets),
            "target_lengths": torch.tensor([len(t) for t in targets])}


def length_batches(records: list[dict], batch_frames: int, rng: np.random.Generator):
    """Endless batches of about ``batch_frames`` mel frames, one language and similar lengths per
    batch, in a fresh random order each epoch. (Batches that mixed English letters with Mandarin
    pinyin units stall CTC on the all-blank plateau at this scale; single-language batches do not.)"""
    batches = []
    for lang in sorted({r["lang"] for r in records}):
        current, frames = [], 0
        for r in sorted((r for r in records if r["lang"] == lang), key=lambda r: r["mel"].shape[-1]):
            current.append(r)
            frames += r["mel"].shape[-1]
            if frames >= batch_frames:
                batches.append(current)
                current, frames = [], 0
        if current:
            batches.append(current)
    while True:
        for k in rng.permutation(len(batches)):
            yield batches[k]


def ctc_loss(model: SpeechTokenizer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(batch["mel"], batch["mel_lengths"])
    loss = F.ctc_loss(out["log_probs"].transpose(0, 1), batch["targets"], out["lengths"], batch["target_lengths"],
                      blank=0, zero_infinity=True)
    return loss + out["aux_loss"]


@torch.no_grad()
def evaluate(model: SpeechTokenizer, records: list[dict], batch_size: int = 16) -> dict:
    """Held-out error rate of the ASR head over reading units (all languages pooled; "cer") and
    the number of codebook entries used."""
    refs, hyps, codes = [], [], []
    for k in range(0, len(records), batch_size):
        items = records[k: k + batch_size]
        batch = collate(items, model.vocab)
        out = model(batch["mel"], batch["mel_lengths"])
        hyps += model.greedy_transcripts(out["log_probs"], out["lengths"])
        refs += [transcript(it["text"], it["lang"]) for it in items]
        codes += [c[:n] for c, n in zip(out["codes"], out["lengths"])]
    all_codes = torch.cat(codes)
    return {"cer": unit_error_rate(refs, hyps), "codes_used": int(all_codes.unique().numel()),
            "codebook_size": model.codebook_size, "hypotheses": ["".join(h) for h in hyps[:5]],
            "references": ["".join(r) for r in refs[:5]]}


@torch.no_grad()
def extract(model: SpeechTokenizer, records: list[dict], batch_size: int = 16,
            rng: np.random.Generator | None = None) -> list[dict]:
    """Per utterance of ``records`` (with mels, from :func:`load_features`): the speaker and
    language, the codes, and the pre- (Encoder1) and post-quantisation (Proj_up) features.
    Runs only the tokenising part (conv, Encoder1, quantizer); with ``rng``, of :func:`augment`-ed
    mels."""
    out = []
    for k in range(0, len(records), batch_size):
        items = records[k: k + batch_size]
        batch = collate(items, model.vocab)
        mel, lengths = batch["mel"], batch["mel_lengths"]
        if rng is not None:
            mel, lengths = augment(mel, lengths, rng)
        pre, pad = model.encode(mel, lengths)
        post, codes, _ = model.quantizer(model.ln_quant(pre))
        for i, (it, n) in enumerate(zip(items, (~pad).sum(-1).tolist())):
            out.append({"id": it["id"], "speaker": it["speaker"], "lang": it["lang"], "codes": codes[i, :n],
                        "pre": pre[i, :n], "post": post[i, :n]})
    return out


def corpus_tokens(corpus_root: str | Path = "data/corpus",
                  checkpoint: str | Path = "data/checkpoints/speech_tokenizer_fsq.pt",
                  augmented_copy: int = 0) -> dict[str, torch.Tensor]:
    """Speech tokens (25 Hz) of every corpus utterance by the given tokenizer, keyed by utterance
    id; cached under ``<corpus>/cache`` (and recomputed when the checkpoint changes). With
    ``augmented_copy`` k > 0: the tokens of the train split's k-th :func:`augment`-ed copy (new
    tempo and vocal tract per utterance, drawn with seed k), extra training data for the LM."""
    splits = ("train",) if augmented_copy else ("train", "dev", "test", "heldout")

    def compute(only: set[str] | None) -> dict[str, torch.Tensor]:
        model = SpeechTokenizer.from_checkpoint(checkpoint)
        records = [r for split in splits for r in load_features(corpus_root, split) if only is None or r["id"] in only]
        rng = np.random.default_rng(augmented_copy) if augmented_copy else None
        return {f["id"]: f["codes"].short() for f in extract(model, records, rng=rng)}

    key = f"tokens_aug{augmented_copy}" if augmented_copy else "tokens"
    ids = [r["id"] for split in splits for r in load_manifest(corpus_root, split)]
    return checkpoint_cache(corpus_root, checkpoint, key, compute, ids)


def train_tokenizer(corpus_root: str | Path = "data/corpus", quantizer: str = "fsq", preset: str = "tiny",
                    minutes: float = 8.0, out: str | Path | None = None, seed: int = 0,
                    threads: int = 2, device: str = "cpu", augmented: bool = True, spec_augment: bool = False,
                    batch_seconds: float = 30.0, state_path: str | None = None,
                    fsq_dim: int | None = None) -> tuple[SpeechTokenizer, dict]:
    """Train the tiny tokenizer on the corpus' train split (each batch :func:`augment`-ed unless
    ``augmented`` is False, with SpecAugment's masks too if ``spec_augment``); evaluate on dev +
    test sentences of the training voices and on the held-out voices; save. ``fsq_dim`` overrides
    the preset's D (3^D codes): the flow and LM recipes take their speech vocabulary from the
    tokenizer they are trained on."""
    seed_everything(seed)
    train = load_features(corpus_root, "train")
    held = load_features(corpus_root, "dev") + load_features(corpus_root, "test")
    cfg = get_config(preset).speech_tokenizer
    model = SpeechTokenizer(replace(cfg, fsq_dim=fsq_dim or cfg.fsq_dim), build_vocab(train), quantizer)
    tcfg = TrainConfig(lr=3e-4, max_minutes=minutes, seed=seed, warmup_steps=100, threads=threads,
                       batch_seconds=batch_seconds, device=device, state_path=state_path)
    rng = np.random.default_rng(seed)
    batches = length_batches(train, batch_frames=int(tcfg.batch_seconds * 100), rng=rng)
    start = time.time()

    def loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if augmented:
            mel, lengths = augment(batch["mel"], batch["mel_lengths"], rng, freq_masks=2 * spec_augment,
                                   time_masks=2 * spec_augment)
            batch = {**batch, "mel": mel, "mel_lengths": lengths}
        return ctc_loss(model, batch)

    # lr 3e-4: at 1e-3 and above, CTC over four languages stalls on the all-blank plateau behind
    # the 8-d bottleneck (each language alone learns at 1e-3).
    log = train_loop(model, (collate(b, model.vocab) for b in batches), loss, tcfg, desc=f"speech tokenizer ({quantizer})")
    metrics = evaluate(model, held)
    metrics["heldout_voices_cer"] = evaluate(model, load_features(corpus_root, "heldout"))["cer"]
    metrics.update(augmented=augmented, spec_augment=spec_augment, train_seconds=round(time.time() - start, 1))
    print(f"unit error rate: dev/test sentences {metrics['cer']:.3f}, held-out voices {metrics['heldout_voices_cer']:.3f}; "
          f"codes used {metrics['codes_used']} / {metrics['codebook_size']}")
    if out is not None:
        save_checkpoint(out, model, model.model_config(), tcfg, log, metrics=metrics)
    return model, metrics


def train_main(argv: list[str] | None = None) -> None:
    """``python -m minicosy.train tokenizer [--quantizer fsq|vq] [--minutes 8] [--out PATH]``."""
    p = recipe_parser("tokenizer", 8.0, None, device=True)   # --out default: speech_tokenizer_<quantizer>.pt
    p.add_argument("--quantizer", choices=["fsq", "vq"], default="fsq")
    p.add_argument("--no-augment", action="store_true", help="train on the mels as they are (no augment())")
    p.add_argument("--spec-augment", action="store_true", help="augment() with SpecAugment's masks too")
    p.add_argument("--batch-seconds", type=float, default=30.0, help="audio per batch")
    p.add_argument("--fsq-dim", type=int, default=None, help="D of the FSQ (3^D codes; default: the preset's)")
    a = p.parse_args(argv)
    out = a.out or f"data/checkpoints/speech_tokenizer_{a.quantizer}.pt"
    train_tokenizer(a.corpus, a.quantizer, minutes=a.minutes, out=out, seed=a.seed, threads=a.threads, device=a.device,
                    augmented=not a.no_augment, spec_augment=a.spec_augment, batch_seconds=a.batch_seconds,
                    state_path=state_file(a.state, out), fsq_dim=a.fsq_dim)


# ---------------------------------------------------------------------------------------------
# The official tokenizer ships as ONNX (speech_tokenizer_v2.onnx, NOTES.md §6): inputs
# ``feats`` (1, 128, T) float32 and ``feats_length`` (1,) int32, output codes at 25 Hz.

ONNX_LAYOUTS = ("official", "minicosy")
# Parameters the tokenising graph holds; the rest (Encoder2, head, Proj_up) stay as they are.
ONNX_PARAMETERS = ("conv1.", "conv2.", "encoder1.", "ln_quant.", "quantizer.proj_down.", "quantizer.codebook.")
# Official module names -> minicosy's (the official file: conv1, conv2, blocks.N, quantizer.project_in).
ONNX_RENAMES = (("model.", ""), ("blocks.", "encoder1."), ("quantizer.project_in.", "quantizer.proj_down."))
# Which input of which node holds which parameter; MatMul weights are stored (in, out), transposed.
ONNX_ROLES = {"Conv": {1: "weight", 2: "bias"}, "LayerNormalization": {1: "weight", 2: "bias"},
              "MatMul": {1: "weight"}, "Add": {0: "bias", 1: "bias"}}


class _TokenizerFront(nn.Module):
    """conv + Encoder1 + FSQ index, held as ``model.*``: minicosy's layout (parameter names kept)."""

    def __init__(self, model: SpeechTokenizer):
        super().__init__()
        self.model = model

    def forward(self, feats: torch.Tensor, feats_length: torch.Tensor) -> torch.Tensor:
        pre, _ = self.model.encode(feats, feats_length.long())
        return self.model.quantizer(self.model.ln_quant(pre))[1]


class _OfficialFSQ(nn.Module):
    """The official quantiser's inference graph: ``project_in`` (Proj_down), bounded round, index."""

    def __init__(self, fsq: FSQ):
        super().__init__()
        self.project_in, self.levels = fsq.proj_down, fsq.levels

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return digits_to_codes(bounded_round(self.project_in(h), self.levels), self.levels)


class _OfficialFront(nn.Module):
    """The same computation under the official file's module names (conv1, conv2, blocks.N,
    quantizer.project_in), so that the exported nodes are named as there (``/blocks.0/attn/query/MatMul``)."""

    def __init__(self, model: SpeechTokenizer):
        super().__init__()
        if not isinstance(model.quantizer, FSQ):
            raise ValueError("the official ONNX layout holds an FSQ quantizer; export a VQ model with layout='minicosy'")
        self.conv1, self.conv2, self.blocks, self.ln_quant = model.conv1, model.conv2, model.encoder1, model.ln_quant
        self.quantizer = _OfficialFSQ(model.quantizer)

    def forward(self, feats: torch.Tensor, feats_length: torch.Tensor) -> torch.Tensor:
        pre, _ = encode_frames(self.conv1, self.conv2, self.blocks, feats, feats_length.long())
        return self.quantizer(self.ln_quant(pre))


def export_onnx(model: SpeechTokenizer, path: str | Path, layout: str = "official") -> Path:
    """Write the tokenising part of ``model`` to ONNX with the official inputs and output.

    ``layout="official"``: as the official ``speech_tokenizer_v2.onnx`` is laid out — constant
    folding on, nodes named after the official modules (``/conv1/Conv``,
    ``/blocks.3/attn/query/MatMul``, ``/quantizer/project_in/MatMul``), Linear weights stored
    transposed as anonymous ``onnx::MatMul_*`` initializers. ``layout="minicosy"``: no folding,
    every initializer keeps its parameter's name (``model.encoder1.0.attn.query.weight``). In both,
    the exporter shares equal tensors (e.g. untrained LayerNorms) through ``Identity`` nodes;
    :func:`load_from_onnx` reads both layouts."""
    if layout not in ONNX_LAYOUTS:
        raise ValueError(f"unknown ONNX layout {layout!r}; choose one of {ONNX_LAYOUTS}")
    path = Path(path)
    model.eval()
    front = _OfficialFront(model) if layout == "official" else _TokenizerFront(model)
    feats = torch.randn(1, model.cfg.n_mels, 200)
    torch.onnx.export(front, (feats, torch.tensor([200], dtype=torch.int32)), str(path), dynamo=False,
                      input_names=["feats", "feats_length"], output_names=["indices"], opset_version=17,
                      dynamic_axes={"feats": {0: "batch", 2: "frames"}, "feats_length": {0: "batch"},
                                    "indices": {0: "batch", 1: "tokens"}}, do_constant_folding=layout == "official")
    return path


class OnnxSpeechTokenizer:
    """An ONNX tokenizer file (the official one, or :func:`export_onnx`'s) behind :meth:`tokenize`.

    By default it tokenises as the official front end does (``_extract_speech_token``): audio
    resampled to 16 kHz with the official windowed-sinc resampler, the log-mel of the waveform as it
    is (no padding). ``pad_to_tokens=True`` is the tiny recipe's rule, for minicosy's own exports."""

    def __init__(self, path: str | Path, pad_to_tokens: bool = False, resampling: str = "sinc"):
        self.path, self.pad_to_tokens, self.resampling = Path(path), pad_to_tokens, resampling
        self.session = onnx_session(path, "speech tokenizer ONNX file", threads=2)
        self.inputs = [i.name for i in self.session.get_inputs()]
        if len(self.inputs) != 2:
            raise ValueError(f"speech tokenizer ONNX file {path} must take feats and feats_length, takes {self.inputs}")

    def tokenize(self, wav: np.ndarray | torch.Tensor, sr: int) -> torch.Tensor:
        """Speech tokens (tokens,) int64 of one waveform."""
        mel = tokenizer_mel(wav, sr, self.pad_to_tokens, self.resampling).numpy()
        feed = {self.inputs[0]: mel, self.inputs[1]: np.array([mel.shape[-1]], dtype=np.int32)}
        return torch.from_numpy(self.session.run(None, feed)[0].reshape(-1).astype(np.int64))


def _module_path(node_name: str) -> str:
    """The module a node belongs to, from its scope name: ``/blocks.0/mlp/mlp.0/MatMul`` →
    ``blocks.0.mlp.0`` (a child's scope repeats its parent's name)."""
    path: list[str] = []
    for part in node_name.strip("/").split("/")[:-1]:
        names = part.split(".")
        path += names[1:] if path and names[0] == path[-1] else names
    return ".".join(path)


def _minicosy_key(name: str) -> str:
    for old, new in ONNX_RENAMES:
        if name.startswith(old):
            name = new + name[len(old):]
    return name


def onnx_parameters(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tokenizer parameter an ONNX file holds, under minicosy's state-dict names.

    Two sources, which must agree: initializer names that are parameter names (minicosy's layout;
    the exporter's ``Identity`` nodes name the tensors it shared), and the nodes that consume an
    initializer (any layout): a ``Conv``/``LayerNormalization`` node's weight and bias inputs, a
    ``MatMul``'s weight (stored transposed), an ``Add``'s bias, under the module path of the node's
    name, official names renamed (``blocks.N`` → ``encoder1.N``, ``quantizer.project_in`` →
    ``quantizer.proj_down``). Raises ``ValueError`` where two sources disagree."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in arrays:
            arrays[node.output[0]] = arrays[node.input[0]]
    found: dict[str, list[np.ndarray]] = {}
    for name, array in arrays.items():
        found.setdefault(_minicosy_key(name), []).append(array)
    for node in graph.node:
        for k, name in enumerate(node.input):
            role = ONNX_ROLES.get(node.op_type, {}).get(k)
            if role and name in arrays and arrays[name].size > 1:
                array = arrays[name].T if node.op_type == "MatMul" else arrays[name]
                found.setdefault(_minicosy_key(f"{_module_path(node.name)}.{role}"), []).append(array)
    params = {k: v for k, v in found.items() if k.startswith(ONNX_PARAMETERS) and k.endswith((".weight", ".bias"))}
    clashes = [k for k, v in params.items() if any(a.shape != v[0].shape or not np.array_equal(a, v[0]) for a in v)]
    if clashes:
        raise ValueError(f"ONNX file {path} holds different tensors for {clashes}")
    return {k: torch.from_numpy(v[0].copy()) for k, v in params.items()}


def load_from_onnx(path: str | Path, model: SpeechTokenizer) -> SpeechTokenizer:
    """Copy an ONNX file's conv/Encoder1/quantiser parameters into ``model``, strictly: the official
    file's layout or minicosy's (:func:`onnx_parameters` maps both). Parameters the file does not
    hold (Encoder2, the ASR head, Proj_up) are left as they are. Raises ``ValueError`` naming every
    tokenizer parameter that is missing, every one the model lacks (e.g. a seventh block) and every
    shape conflict."""
    weights = onnx_parameters(path)
    state = model.state_dict()
    wanted = [k for k in state if k.startswith(ONNX_PARAMETERS)]
    missing = [k for k in wanted if k not in weights]
    unexpected = sorted(k for k in weights if k not in state)
    wrong = [f"{k} {tuple(weights[k].shape)} != {tuple(state[k].shape)}"
             for k in wanted if k in weights and weights[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"ONNX file {path} does not fit the tokenizer: missing {missing}; unexpected {unexpected}; "
                         f"shape conflicts {wrong}")
    model.load_state_dict({k: weights[k] for k in wanted}, strict=False)
    return model
