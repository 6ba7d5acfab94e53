"""Is the self-made corpus fit for TTS? Independent judges on the built corpus: pocketsphinx must
understand the English voices, and resemblyzer must tell the voices apart.

pocketsphinx's acoustic model cannot read espeak-ng's formant synthesis (WER 0.8-0.9 even for plain
``en-us`` at default rate), so the per-voice bound applies to the other engines; espeak's numbers
are printed for the record."""
from collections import defaultdict

import numpy as np

from minicosy.audio import load_wav
from minicosy.data import load_manifest
from minicosy.eval import SpeakerEncoder, SphinxASR, equal_error_rate, error_rate, trial_scores


def _per_speaker(records, n):
    by = defaultdict(list)
    for r in records:
        if r["split"] != "train" and len(by[r["speaker"]]) < n:
            by[r["speaker"]].append(r)
    return by


def test_english_voices_are_intelligible(corpus_root):
    records = [r for r in load_manifest(corpus_root) if r["lang"] == "en"]
    asr = SphinxASR()
    print()
    rates = {}
    for speaker, rs in sorted(_per_speaker(records, 5).items()):
        hyps = [asr.transcribe(*load_wav(corpus_root / r["path"])) for r in rs]
        rates[speaker] = error_rate([r["text"] for r in rs], hyps, "en")
        print(f"  pocketsphinx WER {speaker:16s} {rates[speaker]:.2f}")
    print(f"  mean over {len(rates)} English voices: {np.mean(list(rates.values())):.2f}")
    engines = {r["speaker"]: r["engine"] for r in records}
    judged = {s: wer for s, wer in rates.items() if engines[s] != "espeak"}
    assert len(judged) >= 5 and max(judged.values()) < 0.6


def test_voices_are_distinct_speakers(corpus_root):
    enc = SpeakerEncoder()
    embeddings, speakers = [], []
    for speaker, rs in sorted(_per_speaker(load_manifest(corpus_root), 4).items()):
        for r in rs:
            embeddings.append(enc.embed(*load_wav(corpus_root / r["path"])))
            speakers.append(speaker)
    scores, labels = trial_scores(np.stack(embeddings), speakers)
    eer, _ = equal_error_rate(scores, labels)
    same, diff = scores[labels == 1].mean(), scores[labels == 0].mean()
    print(f"\n  resemblyzer over {len(set(speakers))} corpus voices: same {same:.3f}, different {diff:.3f}, "
          f"EER {eer:.3f}")
    assert same > diff + 0.1
    assert eer < 0.2
