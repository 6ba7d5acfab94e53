"""WER against the LM's training time: a model folder's chain with its LM swapped for each snapshot.

    python scripts/learning_curve.py --model tiny-phone --corpus data/corpus_large \
        --voice flite_rms --per-voice 20 --json data/checkpoints/learning_curve.json \
        runs/snaps/step*.pt data/checkpoints/lm_phone.pt runs/lm_mix.pt+90

Each LM is a snapshot of ``train lm --snapshots DIR`` (or a training state: the same keys), whose
training minutes it records, or a checkpoint (its card's training time). ``PATH+M`` adds M minutes
for a run that started from another (``--init``). The flow, vocoder and prompts stay those of
``--model``; every point synthesises the same sentences (offline, zero-shot, seed 0) and reports
pocketsphinx's WER next to the voices' own recordings of them (``minicosy.eval.voice_trials``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minicosy.audio import load_wav
from minicosy.eval import SphinxASR, error_rate, voice_trials
from minicosy.lm import TextSpeechLM
from minicosy.pipeline import CosyVoice2, join_speech
from minicosy.train import load_checkpoint, load_state_dict_checked, read_torch_file


def load_lm(spec: str, like: TextSpeechLM) -> tuple[TextSpeechLM, float, str]:
    """The LM of ``PATH[+MINUTES]`` and its training minutes (plus the offset)."""
    path, _, offset = spec.partition("+")
    data = read_torch_file(path)
    if "model" in data:                          # a snapshot or a training state: the sizes of ``like``
        lm = TextSpeechLM(like.cfg, like.text_vocab_size)
        load_state_dict_checked(lm, {k: v.float() for k, v in data["model"].items()}, path)
        minutes = data["elapsed"] / 60
    else:
        lm = TextSpeechLM.from_checkpoint(path)
        minutes = load_checkpoint(path)["log"]["seconds"] / 60
    return lm.eval(), minutes + float(offset or 0), path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("lms", nargs="+", help="snapshots, training states or checkpoints, each PATH or PATH+MINUTES")
    p.add_argument("--model", default="tiny-phone")
    p.add_argument("--corpus", default="data/corpus_large")
    p.add_argument("--voices", default="heldout", choices=("heldout", "seen"))
    p.add_argument("--voice", action="append", help="only these voices of the set (default: flite_rms)")
    p.add_argument("--per-voice", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json")
    p.add_argument("--append", action="store_true", help="add the points to those already in --json (same sentences)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    tts, root, asr = CosyVoice2.from_pretrained(a.model), Path(a.corpus), SphinxASR()
    names = a.voice or ["flite_rms"]
    trials = [t for v, ts in voice_trials(root, a.voices, a.per_voice).items() if v in names for t in ts]
    if not trials:
        raise ValueError(f"none of the voices {names} is in the {a.voices!r} set of {root}")
    refs = [t["target"]["text"] for t in trials]
    recordings = error_rate(refs, [asr.transcribe(*load_wav(root / t["target"]["path"])) for t in trials], "en")
    points = []
    for spec in a.lms:
        tts.lm, minutes, path = load_lm(spec, tts.lm)
        hyps = []
        for t in tqdm(trials, desc=Path(path).name):
            prompt = t["prompt"]
            wav = join_speech(tts.inference_zero_shot(t["target"]["text"], prompt["text"], str(root / prompt["path"]),
                                                      seed=0))[0].numpy()
            hyps.append(asr.transcribe(wav, tts.sample_rate))
        wer = error_rate(refs, hyps, "en")
        points.append({"lm": spec, "minutes": round(minutes, 1), "WER": round(wer, 4),
                       "ratio": round(wer / max(recordings, 1e-9), 3)})
        print(f"{minutes:7.1f} min  WER {wer:.3f}  ({wer / max(recordings, 1e-9):.2f}x the recordings' {recordings:.3f})",
              flush=True)
    if a.json:
        result = {"model": a.model, "corpus": a.corpus, "voices": names, "set": a.voices, "sentences": len(trials),
                  "WER recordings": round(recordings, 4), "points": points}
        if a.append and Path(a.json).exists():
            before = json.loads(Path(a.json).read_text())
            if {k: v for k, v in before.items() if k != "points"} != {k: v for k, v in result.items() if k != "points"}:
                raise ValueError(f"{a.json} holds another evaluation (model, corpus, voices or sentences differ)")
            result["points"] = before["points"] + points
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
