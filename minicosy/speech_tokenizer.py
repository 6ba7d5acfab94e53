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

Length rule: a waveform of n samples at 16 kHz gives ``n // 160`` Whisper frames and
``ceil(frames / 4)`` tokens; :meth:`SpeechTokenizer.tokenize` pads to a multiple of 640 samples,
so it returns exactly ``ceil(n / 640)`` tokens — 25 per second.

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
from .data import checkpoint_cache, load_manifest
from .fsq import FSQ, VectorQuantizer
from .textnorm import english_phones, transcript  # noqa: F401  (reading units; re-exported here)
from .train import (TrainConfig, model_from_checkpoint, onnx_session, recipe_parser, save_checkpoint, seed_everything,
                    state_file, train_loop)

HOP = 160            # Whisper hop at 16 kHz
SAMPLES_PER_TOKEN = 4 * HOP


def num_tokens(num_samples: int) -> int:
    """Tokens for a 16 kHz waveform of ``num_samples`` once padded to whole tokens (25 per second)."""
    return math.ceil(num_samples / SAMPLES_PER_TOKEN)


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
        x = F.gelu(self.conv2(F.gelu(self.conv1(mel)))).transpose(1, 2)
        lengths = self.token_lengths(mel_lengths)
        pad = torch.arange(x.shape[1], device=x.device)[None, :] >= lengths[:, None]
        for block in self.encoder1:
            x = block(x, pad)
        return x, pad

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

    @staticmethod
    def _mel(wav: np.ndarray | torch.Tensor, sr: int) -> torch.Tensor:
        """Whisper log-mel (1, 128, frames) of one waveform, padded to whole tokens."""
        wav = np.asarray(wav, dtype=np.float32).reshape(-1)
        wav = resample(wav, sr, 16000)
        if wav.size == 0 or float(np.abs(wav).max()) < 1e-5:
            raise ValueError("cannot tokenise empty or silent audio")
        wav = np.pad(wav, (0, num_tokens(wav.size) * SAMPLES_PER_TOKEN - wav.size))
        return whisper_log_mel(torch.from_numpy(wav)).unsqueeze(0)

    @torch.no_grad()
    def tokenize(self, wav: np.ndarray | torch.Tensor, sr: int) -> torch.Tensor:
        """Speech tokens of one waveform at exactly 25 per second (see the module's length rule)."""
        mel = self._mel(wav, sr)
        pre, _ = self.encode(mel, torch.tensor([mel.shape[-1]]))
        return self.quantizer(self.ln_quant(pre))[1][0]

    @torch.no_grad()
    def read_units(self, wav: np.ndarray | torch.Tensor, sr: int) -> list[str]:
        """The reading units the ASR head hears in one waveform, through the quantised tokens."""
        mel = self._mel(wav, sr)
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
        return model_from_checkpoint(path, lambda mc: cls(SpeechTokenizerConfig(**mc["cfg"]), mc["vocab"], mc["quantizer"]))


# ---------------------------------------------------------------------------------------------
# Training on the corpus (§4.1 at small scale): CTC over reading units, FSQ or VQ bottleneck.

def unit_error_rate(references: list[list[str]], hypotheses: list[list[str]]) -> float:
    """Edit distance over reading units / reference units, pooled over utterances."""
    import jiwer

    return float(jiwer.wer([" ".join(r) for r in references], [" ".join(h) if h else "" for h in hypotheses]))


def load_features(corpus_root: str | Path, split: str) -> list[dict]:
    """Manifest records of a split with their 16 kHz Whisper log-mels (cached beside the corpus)."""
    cache = Path(corpus_root) / "cache" / f"whisper_mel_{split}.pt"
    records = load_manifest(corpus_root, split)
    if cache.exists():
        mels = torch.load(cache, weights_only=True)
        if len(mels) == len(records) and all(r["id"] in mels for r in records):
            return [{**r, "mel": mels[r["id"]]} for r in records]
    mels = {}
    for r in records:
        wav, _ = load_wav(Path(corpus_root) / r["path"], 16000)
        wav = np.pad(wav, (0, num_tokens(wav.size) * SAMPLES_PER_TOKEN - wav.size))
        mels[r["id"]] = whisper_log_mel(torch.from_numpy(wav)).half()
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(mels, cache)
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
    def compute() -> dict[str, torch.Tensor]:
        model = SpeechTokenizer.from_checkpoint(checkpoint)
        splits = ("train",) if augmented_copy else ("train", "dev", "test", "heldout")
        records = [r for split in splits for r in load_features(corpus_root, split)]
        rng = np.random.default_rng(augmented_copy) if augmented_copy else None
        return {f["id"]: f["codes"].short() for f in extract(model, records, rng=rng)}

    key = f"tokens_aug{augmented_copy}" if augmented_copy else "tokens"
    return checkpoint_cache(corpus_root, checkpoint, key, compute)


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

class _TokenizerFront(nn.Module):
    """conv + Encoder1 + FSQ index: the part of the model that the ONNX file contains."""

    def __init__(self, model: SpeechTokenizer):
        super().__init__()
        self.model = model

    def forward(self, feats: torch.Tensor, feats_length: torch.Tensor) -> torch.Tensor:
        pre, _ = self.model.encode(feats, feats_length.long())
        return self.model.quantizer(self.model.ln_quant(pre))[1]


def export_onnx(model: SpeechTokenizer, path: str | Path) -> Path:
    """Write the tokenising part of ``model`` to ONNX with the official input/output layout.
    Constant folding is off so that every initializer keeps its parameter's name."""
    path = Path(path)
    front = _TokenizerFront(model.eval())
    feats = torch.randn(1, model.cfg.n_mels, 200)
    torch.onnx.export(front, (feats, torch.tensor([200], dtype=torch.int32)), str(path), dynamo=False,
                      input_names=["feats", "feats_length"], output_names=["indices"], opset_version=17,
                      dynamic_axes={"feats": {0: "batch", 2: "frames"}, "feats_length": {0: "batch"},
                                    "indices": {0: "batch", 1: "tokens"}}, do_constant_folding=False)
    return path


class OnnxSpeechTokenizer:
    """An ONNX tokenizer file (the official one, or :func:`export_onnx`'s) behind :meth:`tokenize`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.session = onnx_session(path, "speech tokenizer ONNX file", threads=2)
        self.inputs = [i.name for i in self.session.get_inputs()]

    def tokenize(self, wav: np.ndarray | torch.Tensor, sr: int) -> torch.Tensor:
        """Same preprocessing and length rule as :meth:`SpeechTokenizer.tokenize`."""
        wav = resample(np.asarray(wav, dtype=np.float32).reshape(-1), sr, 16000)
        if wav.size == 0 or float(np.abs(wav).max()) < 1e-5:
            raise ValueError("cannot tokenise empty or silent audio")
        wav = np.pad(wav, (0, num_tokens(wav.size) * SAMPLES_PER_TOKEN - wav.size))
        mel = whisper_log_mel(torch.from_numpy(wav)).unsqueeze(0).numpy()
        feed = {self.inputs[0]: mel, self.inputs[1]: np.array([mel.shape[-1]], dtype=np.int32)}
        return torch.from_numpy(self.session.run(None, feed)[0].reshape(-1).astype(np.int64))


def load_from_onnx(path: str | Path, model: SpeechTokenizer, name_map: dict[str, str] | None = None) -> SpeechTokenizer:
    """Copy an ONNX file's initializers into ``model``'s conv/Encoder1/FSQ parameters.

    Initializers are matched by name (``name_map`` renames ONNX names to minicosy's first, as the
    official file's node naming requires); shapes must agree. Parameters the ONNX file does not
    hold (Encoder2, the ASR head, Proj_up) are left as they are. Raises ``ValueError`` naming
    every tokenizer parameter that is missing or has the wrong shape.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    weights = {(name_map or {}).get(t.name, t.name): torch.from_numpy(numpy_helper.to_array(t).copy())
               for t in graph.initializer}
    state = model.state_dict()
    prefix = "model."
    wanted = [k for k in state if k.startswith(("conv1.", "conv2.", "encoder1.", "ln_quant.", "quantizer.proj_down.",
                                                "quantizer.codebook."))]
    missing = [k for k in wanted if prefix + k not in weights]
    wrong = [f"{k} {tuple(weights[prefix + k].shape)} != {tuple(state[k].shape)}"
             for k in wanted if prefix + k in weights and weights[prefix + k].shape != state[k].shape]
    if missing or wrong:
        raise ValueError(f"ONNX file {path} does not fit the tokenizer: missing {missing}; shape conflicts {wrong}")
    model.load_state_dict({k: weights[prefix + k] for k in wanted}, strict=False)
    return model
