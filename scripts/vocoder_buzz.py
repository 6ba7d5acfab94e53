"""How strongly each vocoder beats at the 50 Hz mel frame rate, voice by voice, against the recordings.

    python scripts/vocoder_buzz.py --corpus data/corpus_large --per-voice 4 \
        data/checkpoints/hift_phone.pt runs/hb/hift.pt --json buzz.json

For each voice's first ``--per-voice`` English ``eval`` sentences (``minicosy.eval.voice_trials``,
seen and held-out voices), the median :func:`minicosy.eval_instruct.frame_rate_buzz` of the recording
and of each HiFT checkpoint's re-synthesis from the recording's mel (seed 0). Speech scores a few
units; a tiny HiFT's frame-synchronous pattern scores tens (notebook 07 §6), which the mel loss
cannot see (``train hift --buzz-weight``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from minicosy.audio import load_wav, mel_spectrogram
from minicosy.eval import voice_trials
from minicosy.eval_instruct import frame_rate_buzz
from minicosy.hift import HiFTGenerator


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("hift", nargs="+", help="HiFT checkpoints (train hift --out)")
    p.add_argument("--corpus", default="data/corpus_large")
    p.add_argument("--per-voice", type=int, default=4)
    p.add_argument("--json", help="also write the per-utterance values")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    models = {path: HiFTGenerator.from_checkpoint(path) for path in a.hift}
    columns = ["recording", *models]
    rows: dict[str, dict[str, list[float]]] = {}
    for voices in ("seen", "heldout"):
        for voice, trials in voice_trials(a.corpus, voices, a.per_voice).items():
            for trial in trials:
                wav, _ = load_wav(Path(a.corpus) / trial["target"]["path"], 24000)
                mel = mel_spectrogram(wav)[None]
                row = rows.setdefault(voice, {c: [] for c in columns})
                row["recording"].append(frame_rate_buzz(wav, 24000))
                for path, model in models.items():
                    with torch.inference_mode():
                        out = model.inference(mel, generator=torch.Generator().manual_seed(0))[0][0].numpy()
                    row[path].append(frame_rate_buzz(out, 24000))
    labels = ["recording", *(chr(ord("A") + k) for k in range(len(models)))]
    for label, path in zip(labels[1:], models):
        print(f"{label}: {path}")
    print(f"{'voice':16s}" + "".join(f" {label:>10s}" for label in labels))
    for voice, row in rows.items():
        print(f"{voice:16s}" + "".join(f" {np.median(row[c]):10.1f}" for c in columns))
    print(f"{'all (median)':16s}" + "".join(f" {np.median([x for r in rows.values() for x in r[c]]):10.1f}" for c in columns))
    if a.json:
        Path(a.json).write_text(json.dumps({"columns": columns, "voices": rows}, indent=1))


if __name__ == "__main__":
    main()
