"""Pictures for the notebooks and the CLI: the pipeline diagram (drawn from a config), corpus
statistics and spectrograms. Matplotlib only; every function returns its figure.

Usage::

    from minicosy.config import get_config
    from minicosy.viz import plot_pipeline
    plot_pipeline(get_config("cosyvoice2_0p5b"))
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import FancyBboxPatch

from .config import MiniCosyConfig
from .data import corpus_stats

_COLORS = {"text": "#dbeafe", "lm": "#fde68a", "flow": "#bbf7d0", "voc": "#fecaca", "prompt": "#e9d5ff",
           "io": "#f3f4f6"}


def _box(ax, x, y, w, h, title, body, kind):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                fc=_COLORS[kind], ec="#374151", lw=1.2))
    ax.text(x + w / 2, y + h * 0.68, title, ha="center", va="center", fontsize=10, fontweight="bold")
    ax.text(x + w / 2, y + h * 0.3, body, ha="center", va="center", fontsize=7.5, color="#111827")


def _arrow(ax, start, end, label="", color="#111827"):
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="->", lw=1.4, color=color))
    if label:
        ax.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.12, label, ha="center", va="bottom",
                fontsize=8, color="#1d4ed8", fontweight="bold")


def plot_pipeline(cfg: MiniCosyConfig) -> plt.Figure:
    """CosyVoice 2 (Fig. 1) as boxes whose sizes and rates are read from ``cfg``."""
    f, lm, fl, hf, st = cfg.features, cfg.lm, cfg.flow, cfg.hift, cfg.speech_tokenizer
    fig, ax = plt.subplots(figsize=(16, 6.6))
    ax.set(xlim=(0, 18.4), ylim=(0, 6.6))
    ax.axis("off")
    h, y = 1.3, 4.6
    main = [(0.1, 1.9, "text", "raw text, no g2p\nen / zh / ja / ko", "io"),
            (3.0, 2.6, "BPE tokenizer §2.1", f"vocab {cfg.text.vocab_size}\nmulti-char CJK masked", "text"),
            (6.6, 3.0, "text-speech LM §2.3", f"Qwen2 {lm.num_hidden_layers} × {lm.hidden_size}, "
             f"{lm.num_attention_heads} heads\nhead: {lm.speech_token_size} + 3 ids, RAS sampling", "lm"),
            (10.8, 3.3, "flow matching §2.4", f"encoder {fl.encoder_blocks}+{fl.up_encoder_blocks} × "
             f"{fl.encoder_size}, look-ahead P={fl.pre_lookahead_len}\ncausal UNet {fl.estimator_channels} ch, "
             f"NFE {fl.n_timesteps}, CFG β={fl.cfg_rate}", "flow"),
            (15.3, 2.9, "HiFT vocoder", f"NSF source, ×{'·'.join(map(str, hf.upsample_rates))} up-sampling\n"
             f"iSTFT n_fft {hf.istft_n_fft}, hop {hf.istft_hop}", "voc")]
    for x, w, title, body, kind in main:
        _box(ax, x, y, w, h, title, body, kind)
    labels = ["", "text ids", f"tokens\n{cfg.token_rate} Hz", f"{f.n_mels} mel\n{cfg.mel_rate} Hz"]
    for (x0, w0, *_), (x1, *_), label in zip(main, main[1:], labels):
        _arrow(ax, (x0 + w0, y + h / 2), (x1, y + h / 2), label)
    ax.text(16.75, y + h + 0.25, f"→ {f.sample_rate // 1000} kHz waveform", ha="center", fontsize=10,
            color="#1d4ed8", fontweight="bold")
    # the prompt side (zero-shot / in-context learning)
    _box(ax, 0.1, 1.35, 1.9, h, "prompt audio", "and its transcript\n(zero-shot, §2.3 ICL)", "io")
    side = [(2.75, "speech tokenizer §2.2", f"Whisper {f.whisper_n_mels}-mel @ {f.tokenizer_sample_rate // 1000} kHz"
             f" → FSQ\nD={st.fsq_dim}, K={st.fsq_levels}: {st.codebook_size} codes", (7.6, y), "prompt tokens"),
            (1.45, "mel extractor", f"{f.n_mels} bins @ {f.sample_rate // 1000} kHz, hop {f.hop_length}\n"
             f"{cfg.mel_rate} frames/s", (11.6, y), "prompt mel X̃"),
            (0.15, "CAM++ speaker model", f"Kaldi fbank {f.fbank_n_mels} @ {f.speaker_sample_rate // 1000} kHz\n"
             f"→ {fl.spk_embed_dim}-d speaker embedding v", (13.2, y), "speaker v")]
    for by, title, body, target, label in side:
        _box(ax, 3.0, by, 3.0, 1.1, title, body, "prompt")
        _arrow(ax, (2.0, 2.0), (3.0, by + 0.55))
        ax.annotate("", xy=target, xytext=(6.0, by + 0.55), arrowprops=dict(
            arrowstyle="->", lw=1.2, color="#6d28d9", connectionstyle="angle,angleA=0,angleB=90"))
        ax.text(target[0] + 0.1, by + 0.65, label, fontsize=8.5, color="#6d28d9", fontweight="bold")
    ax.set_title(f"CosyVoice 2 as built by minicosy (preset '{cfg.name}')", fontsize=12)
    fig.tight_layout()
    return fig


def plot_corpus_stats(records: list[dict]) -> plt.Figure:
    """Minutes per language, and per voice stacked by split."""
    stats = corpus_stats(records)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1, 3]})
    langs = list(stats["per_lang"])
    axes[0].bar(langs, [stats["per_lang"][k]["hours"] * 60 for k in langs], color="tab:blue")
    axes[0].set(title="minutes per language", ylabel="minutes")
    speakers = list(stats["per_speaker"])
    bottom = np.zeros(len(speakers))
    for split in ("train", "dev", "test", "heldout"):
        mins = np.array([sum(r["duration"] for r in records if r["speaker"] == s and r["split"] == split) / 60
                         for s in speakers])
        axes[1].bar(speakers, mins, bottom=bottom, label=split)
        bottom += mins
    axes[1].set(title=f"minutes per voice ({stats['voices']} voices, {stats['hours']:.2f} h)")
    axes[1].tick_params(axis="x", rotation=60)
    axes[1].legend()
    fig.tight_layout()
    return fig


def show_spectrogram(ax: plt.Axes, spec: np.ndarray, rate: float, title: str, ylabel: str = "bin") -> None:
    """Draw a (bins, frames) feature with time in seconds on the x axis."""
    spec = np.asarray(spec)
    ax.imshow(spec, origin="lower", aspect="auto", cmap="magma", extent=(0, spec.shape[1] / rate, 0, spec.shape[0]))
    ax.set(title=title, xlabel="seconds", ylabel=ylabel)
