"""The project's own multi-speaker, multilingual TTS corpus, and datasets over it.

The corpus is rendered offline from the sentences in ``data/texts/{en,zh,ja,ko}.txt`` by the
engines of :mod:`minicosy.engines` (≥ 12 voices), resampled to 24 kHz, trimmed and
peak-normalised, and written to ``data/corpus/`` (git-ignored) with

* ``manifest.jsonl`` -- one line per utterance: id, text, lang, speaker, engine, gender, path,
  duration, sample_rate, split;
* ``corpus.json``    -- the build's summary: voices used, engines skipped (not installed), counts,
  hours, build time, and its ``fingerprint`` (:func:`corpus_fingerprint`: the SHA-256 of every
  file and of the whole, with the engine and package versions). Rendering is deterministic (see
  :mod:`minicosy.engines`): two builds with the same versions give the same fingerprint;
* ``instruct/``      -- the instruct sub-corpus (§2.6, :func:`build_instruct`): training sentences
  re-rendered at other speaking rates and pitches and with emphasised words, each paired with an
  instruction; a corpus root of its own (same manifest layout plus the instruct fields).

Splits are fixed by a hash of the sentence id, so every rendering of a sentence lands in the same
split: ``train`` / ``dev`` / ``test``; voices marked ``heldout`` never appear in training and form
the ``heldout`` split for zero-shot tests.

Usage::

    python -m minicosy.data build            # ~2 h of audio + the instruct sub-corpus, both cores
    python -m minicosy.data stats            # hours per language and voice (+ stats.png)

    from minicosy.data import load_manifest, CorpusDataset
    train = CorpusDataset("data/corpus", split="train")
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import random
import sys
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import soundfile as sf
import torch
from tqdm.auto import tqdm

from .audio import load_wav, resample, trim_silence
from .config import CorpusConfig
from .engines import VOICES, Voice, engine_available, engine_versions, synthesize
from .instruct import CONDITIONS, TEMPLATES, instruction, mark_word, render_voice, unsupported

LANGS = ("en", "zh", "ja", "ko")
SPLITS = ("train", "dev", "test", "heldout", "eval")    # eval: the large corpus' evaluation sentences
INSTRUCT_DIR = "instruct"       # the instruct sub-corpus: <corpus>/instruct, a corpus root of its own
MIN_SECONDS, MAX_SECONDS = 1.0, 15.0
PEAK = 0.9


# manifest field of the large corpus' second helping of training text (``CorpusConfig.large_more``)
MORE_TIER = "more"


@dataclass(frozen=True)
class Job:
    """One utterance to render."""

    id: str
    text: str
    voice: Voice
    split: str
    extra: tuple = ()       # (key, value) pairs added to the manifest record (the instruct sub-corpus)


def read_texts(texts_dir: str | Path) -> dict[str, list[str]]:
    """The shipped sentences, one per line, per language."""
    texts = {}
    for lang in LANGS:
        path = Path(texts_dir) / f"{lang}.txt"
        if not path.exists():
            raise FileNotFoundError(f"sentence file {path} is missing")
        texts[lang] = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return texts


def sentence_hash(sentence_id: str, cfg: CorpusConfig) -> float:
    """A stable number in [0, 1] per sentence id (independent of Python's hash seed)."""
    return int(hashlib.sha1(f"{cfg.seed}:{sentence_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def sentence_split(sentence_id: str, cfg: CorpusConfig) -> str:
    """train/dev/test by :func:`sentence_hash`."""
    h = sentence_hash(sentence_id, cfg)
    if h < cfg.dev_fraction:
        return "dev"
    if h < cfg.dev_fraction + cfg.test_fraction:
        return "test"
    return "train"


def plan_corpus(texts: dict[str, list[str]], voices: list[Voice], cfg: CorpusConfig,
                heldout_per_voice: int = 40, second_take: float = 0.1) -> list[Job]:
    """Assign sentences to voices, deterministically.

    Each sentence is rendered by one training voice of its language (round robin over a seeded
    shuffle); a share ``second_take`` of sentences get a second voice (parallel data across
    speakers). Each held-out voice renders ``heldout_per_voice`` test/dev sentences.
    """
    rng = random.Random(cfg.seed)
    jobs = []
    for lang, sentences in texts.items():
        train_voices = [v for v in voices if v.lang == lang and not v.heldout]
        held_voices = [v for v in voices if v.lang == lang and v.heldout]
        if not train_voices:
            continue
        order = list(range(len(sentences)))
        rng.shuffle(order)
        for k, i in enumerate(order):
            sid = f"{lang}{i:04d}"
            split = sentence_split(sid, cfg)
            voice = train_voices[k % len(train_voices)]
            jobs.append(Job(f"{voice.name}-{sid}", sentences[i], voice, split))
            if len(train_voices) > 1 and rng.random() < second_take:
                other = train_voices[(k + 1 + rng.randrange(len(train_voices) - 1)) % len(train_voices)]
                jobs.append(Job(f"{other.name}-{sid}", sentences[i], other, split))
        evaluation = [i for i in range(len(sentences)) if sentence_split(f"{lang}{i:04d}", cfg) != "train"]
        for voice in held_voices:
            for i in rng.sample(evaluation, min(heldout_per_voice, len(evaluation))):
                jobs.append(Job(f"{voice.name}-{lang}{i:04d}", sentences[i], voice, "heldout"))
    return sorted(jobs, key=lambda j: j.id)


def _render(job: Job, root: str, sample_rate: int) -> dict | None:
    """Synthesise, resample, trim, normalise and store one utterance (runs in a worker)."""
    wav, sr = synthesize(job.voice, job.text)
    wav = trim_silence(resample(wav, sr, sample_rate), sample_rate)
    duration = len(wav) / sample_rate
    if not MIN_SECONDS <= duration <= MAX_SECONDS:
        return {"id": job.id, "dropped": f"duration {duration:.2f} s"}
    wav = wav * (PEAK / max(float(np.abs(wav).max()), 1e-6))
    rel = f"wavs/{job.voice.name}/{job.id}.wav"
    os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
    sf.write(os.path.join(root, rel), wav, sample_rate, subtype="PCM_16")
    return {"id": job.id, "text": job.text, "lang": job.voice.lang, "speaker": job.voice.name,
            "engine": job.voice.engine, "gender": job.voice.gender, "path": rel,
            "duration": round(duration, 3), "sample_rate": sample_rate, "split": job.split, **dict(job.extra)}


def _render_star(args: tuple) -> dict | None:
    return _render(*args)


def render_jobs(jobs: list[Job], root: Path, sample_rate: int, workers: int | None = None,
                progress: bool = True) -> tuple[list[dict], list[dict]]:
    """Render ``jobs`` into ``root`` on ``workers`` processes (both cores by default), with a
    progress bar; returns the kept records and the dropped ones (outside the duration limits)."""
    root.mkdir(parents=True, exist_ok=True)
    workers = workers or min(2, os.cpu_count() or 1)
    tasks = [(job, str(root), sample_rate) for job in jobs]
    desc = f"rendering {len(jobs)} utterances on {workers} process(es)"
    if workers > 1:
        with mp.get_context("fork").Pool(workers) as pool:
            results = list(tqdm(pool.imap_unordered(_render_star, tasks, chunksize=8), total=len(tasks),
                                desc=desc, disable=not progress))
    else:
        results = [_render_star(t) for t in tqdm(tasks, desc=desc, disable=not progress)]
    records = sorted((r for r in results if "dropped" not in r), key=lambda r: r["id"])
    return records, sorted((r for r in results if "dropped" in r), key=lambda r: r["id"])


def write_manifest(root: Path, records: list[dict]) -> None:
    """``manifest.jsonl``: one JSON line per record."""
    with open(root / "manifest.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def build_corpus(cfg: CorpusConfig | None = None, workers: int | None = None, limit: int | None = None,
                 force: bool = False) -> dict:
    """Render the corpus into ``cfg.root``; returns the summary written to ``corpus.json``.

    ``limit`` keeps only the first N planned utterances per voice (for quick tests). Engines that
    are not installed are skipped with a warning; fewer than ``cfg.min_voices`` voices is an error.
    """
    cfg = cfg or CorpusConfig()
    root = Path(cfg.root)
    if (root / "manifest.jsonl").exists() and not force:
        raise FileExistsError(f"{root}/manifest.jsonl exists; pass force=True (--force) to rebuild")
    start = time.time()
    skipped = sorted({v.engine for v in VOICES if not engine_available(v.engine)})
    for engine in skipped:
        warnings.warn(f"TTS engine {engine!r} is not installed: its voices are skipped", stacklevel=2)
    voices = [v for v in VOICES if v.engine not in skipped]
    jobs = plan_corpus(read_texts(cfg.texts), voices, cfg)
    if limit is not None:
        per_voice: dict[str, int] = defaultdict(int)
        kept = []
        for job in jobs:
            per_voice[job.voice.name] += 1
            if per_voice[job.voice.name] <= limit:
                kept.append(job)
        jobs = kept
    workers = workers or min(2, os.cpu_count() or 1)
    records, dropped = render_jobs(jobs, root, cfg.sample_rate, workers)
    speakers = sorted({r["speaker"] for r in records})
    if len(speakers) < cfg.min_voices:
        raise RuntimeError(f"the corpus has only {len(speakers)} voices (< {cfg.min_voices}); install the "
                           f"missing TTS engines ({', '.join(skipped) or 'none skipped'}) and rebuild")
    write_manifest(root, records)
    summary = corpus_stats(records)
    summary.update(fingerprint=corpus_fingerprint(root, records), skipped_engines=skipped, dropped=dropped, build_seconds=round(time.time() - start, 1),
                   workers=workers, voice_params=[{"name": v.name, "engine": v.engine, "lang": v.lang,
                                              "gender": v.gender, "heldout": v.heldout, **v.params}
                                             for v in voices])
    (root / "corpus.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False), encoding="utf-8")
    return summary


def read_large_texts(texts_dir: str | Path) -> dict[str, list[str]]:
    """The large corpus' English sentences (``<texts>/large/en_*.txt``, see its SOURCES.md), per
    source: ``{"wordnet": [...], "bible": [...]}``."""
    files = sorted((Path(texts_dir) / "large").glob("en_*.txt"))
    if not files:
        raise FileNotFoundError(f"no {Path(texts_dir) / 'large'}/en_*.txt: write them with `python scripts/large_texts.py`")
    return {f.stem[3:]: [ln.strip() for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()] for f in files}


def large_pool(large: dict[str, list[str]], cfg: CorpusConfig) -> list[tuple[str, str]]:
    """Every large-text sentence as ``(sentence id, text)``, in the seeded order the large corpus
    hands them out (:func:`plan_large`)."""
    pool = [(f"{src[:2]}{i:05d}", text) for src, sentences in sorted(large.items()) for i, text in enumerate(sentences)]
    random.Random(cfg.seed + 17).shuffle(pool)
    return pool


def plan_large(texts: dict[str, list[str]], large: dict[str, list[str]], voices: list[Voice],
               cfg: CorpusConfig) -> list[Job]:
    """The large corpus: every job of :func:`plan_corpus` (so its dev/test/held-out evaluation
    sentences are the small corpus' own) plus distinct large-text sentences, each rendered once:
    ``cfg.large_voices`` get their counts, every other English training voice ``cfg.large_thin``.
    Sentences are drawn from a seeded shuffle of all sources; a share ``cfg.large_dev_fraction``
    (by a hash of the sentence id) is ``dev``, the rest ``train``. Then ``cfg.large_eval`` more
    sentences are read by every English voice, held-out ones included: the ``eval`` split, which
    no training, dev or tokenizer data contains, so that each voice's recordings and syntheses of
    the same sentences can be compared. Last, ``cfg.large_more`` and ``cfg.large_more_thin`` more
    sentences per voice, all ``train`` and marked :data:`MORE_TIER` in the manifest: a corpus built
    before they existed keeps every split's sentences and only grows."""
    by_name = {v.name: v for v in voices}
    missing = sorted({name for name, _ in cfg.large_voices + cfg.large_more if name not in by_name})
    if missing:
        raise ValueError(f"large-corpus voices {missing} are not available (engine not installed or unknown voice)")
    main = [(by_name[name], n) for name, n in cfg.large_voices]
    thin = [(v, cfg.large_thin) for v in voices
            if v.lang == "en" and not v.heldout and v.name not in dict(cfg.large_voices)]
    more = [(by_name[name], n) for name, n in cfg.large_more]
    more += [(v, cfg.large_more_thin) for v, _ in thin]
    pool = large_pool(large, cfg)
    needed = sum(n for _, n in main + thin + more) + cfg.large_eval
    if needed > len(pool):
        raise ValueError(f"the large corpus asks for {needed} sentences; data/texts/large has {len(pool)}")
    jobs, k = plan_corpus(texts, voices, cfg), 0
    for voice, n in main + thin:
        jobs += [Job(f"{voice.name}-{sid}", text, voice, "dev" if sentence_hash(sid, cfg) < cfg.large_dev_fraction
                     else "train") for sid, text in pool[k:k + n]]
        k += n
    for voice in [v for v in voices if v.lang == "en"]:
        jobs += [Job(f"{voice.name}-{sid}", text, voice, "eval") for sid, text in pool[k:k + cfg.large_eval]]
    k += cfg.large_eval
    for voice, n in more:
        jobs += [Job(f"{voice.name}-{sid}", text, voice, "train", ((MORE_TIER, True),)) for sid, text in pool[k:k + n]]
        k += n
    return sorted(jobs, key=lambda j: j.id)


def build_large(cfg: CorpusConfig | None = None, workers: int | None = None, chunk: int = 512) -> dict:
    """Render the large corpus (:func:`plan_large`) into ``cfg.large_root``, resumably: every
    ``chunk`` utterances the records are appended to ``manifest.partial.jsonl``, and a restarted
    build renders only what is not there (rendering is deterministic, so the result is the same as
    one uninterrupted build). Ends with ``manifest.jsonl`` and ``corpus.json`` as :func:`build_corpus`."""
    cfg = cfg or CorpusConfig()
    root, start = Path(cfg.large_root), time.time()
    voices = [v for v in VOICES if engine_available(v.engine)]
    jobs = plan_large(read_texts(cfg.texts), read_large_texts(cfg.texts), voices, cfg)
    partial = root / "manifest.partial.jsonl"
    done: dict[str, dict] = {}
    if (root / "corpus.json").exists():      # a finished build: keep it, render what the plan added
        done = {r["id"]: r for r in load_manifest(root)}
        done.update({r["id"]: r for r in json.loads((root / "corpus.json").read_text(encoding="utf-8"))["dropped"]})
    if partial.exists():
        with open(partial, encoding="utf-8") as f:
            done.update({r["id"]: r for r in map(json.loads, f)})
    todo = [j for j in jobs if j.id not in done]
    root.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=f"large corpus under {root}", unit="utt") as bar:
        for i in range(0, len(todo), chunk):
            records, dropped = render_jobs(todo[i:i + chunk], root, cfg.sample_rate, workers, progress=False)
            with open(partial, "a", encoding="utf-8") as f:
                for r in records + dropped:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
                    done[r["id"]] = r
            bar.update(len(todo[i:i + chunk]))
    for job in jobs:              # the plan's marks, also on records rendered before the plan had them
        done[job.id].update(job.extra)
    records = sorted((r for r in done.values() if "dropped" not in r), key=lambda r: r["id"])
    write_manifest(root, records)
    summary = corpus_stats(records)
    summary.update(fingerprint=corpus_fingerprint(root, records), sentences=len({r["text"] for r in records}),
                   dropped=sorted((r for r in done.values() if "dropped" in r), key=lambda r: r["id"]),
                   build_seconds=round(time.time() - start, 1), large_voices=dict(cfg.large_voices),
                   large_thin=cfg.large_thin, large_more=dict(cfg.large_more), large_more_thin=cfg.large_more_thin)
    (root / "corpus.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False), encoding="utf-8")
    partial.unlink(missing_ok=True)
    return summary


def instruct_pools(texts: dict[str, list[str]], cfg: CorpusConfig) -> dict[str, list[tuple[str, str]]]:
    """The small corpus' training sentences per language, ``(sentence id, text)``: what the instruct
    sub-corpus draws from."""
    return {lang: [(f"{lang}{i:04d}", t) for i, t in enumerate(sentences) if sentence_split(f"{lang}{i:04d}", cfg) == "train"]
            for lang, sentences in texts.items()}


def large_instruct_pools(large: dict[str, list[str]], cfg: CorpusConfig) -> dict[str, list[tuple[str, str]]]:
    """The large corpus' English training sentences of its main voices (:func:`plan_large`'s
    shuffle, ``dev`` ones left out): what the large instruct sub-corpus draws from, so that it never
    holds a dev, test, held-out or ``eval`` sentence."""
    main = large_pool(large, cfg)[:sum(n for _, n in cfg.large_voices)]
    return {"en": [(sid, t) for sid, t in main if sentence_hash(sid, cfg) >= cfg.large_dev_fraction]}


def plan_instruct(pools: dict[str, list[tuple[str, str]]], voices: list[Voice], cfg: CorpusConfig,
                  counts: tuple[tuple[str, int], ...] | None = None) -> tuple[list[Job], list[dict]]:
    """Jobs of the instruct sub-corpus and the (engine, condition) pairs skipped, with why.

    Per language, ``counts`` (default ``cfg.instruct_sentences``) training sentences drawn (seeded)
    from ``pools`` (:func:`instruct_pools`, :func:`large_instruct_pools`). Each is rendered by
    one training voice (round robin) neutrally and under every condition its engine supports; the
    conditions it cannot render (pitch, emphasis) go to a voice that can (round robin over those),
    with a neutral rendering of its own. Each instructed rendering gets one template, its language
    and paraphrase drawn at random.
    """
    rng = random.Random(cfg.seed + 9)
    jobs, skipped = [], {}
    for lang, n in counts or cfg.instruct_sentences:
        train_voices = [v for v in voices if v.lang == lang and not v.heldout]
        pool = pools.get(lang, [])
        if not train_voices or not pool:
            continue
        for k, (sid, text) in enumerate(sorted(rng.sample(pool, min(n, len(pool))))):
            todo = list(CONDITIONS.values())[1:]
            for voice in [train_voices[k % len(train_voices)]] + train_voices[k % len(train_voices) + 1:] + train_voices:
                mine = [c for c in todo if not unsupported(voice, c)]
                for c in todo:
                    if unsupported(voice, c):
                        skipped[(f"{voice.engine} ({voice.lang})", c.name)] = unsupported(voice, c)
                if not mine:
                    continue
                todo = [c for c in todo if c not in mine]
                for cond in [CONDITIONS["neutral"]] + mine:
                    said, word = mark_word(text, rng) if cond.emphasis else (text, "")
                    tlang = rng.choice(sorted(TEMPLATES[cond.name])) if cond.name in TEMPLATES else "en"
                    extra = (("instruction", instruction(cond.name, tlang, rng.randrange(3))), ("condition", cond.name),
                             ("rate", cond.rate), ("semitones", cond.semitones), ("emphasis_word", word),
                             ("plain_text", text), ("neutral_id", f"{voice.name}-{sid}-neutral"))
                    jobs.append(Job(f"{voice.name}-{sid}-{cond.name}", said, render_voice(voice, cond), "train", extra))
                if not todo:
                    break
    return jobs, [{"engine": e, "condition": c, "reason": r} for (e, c), r in sorted(skipped.items())]


def build_instruct(cfg: CorpusConfig | None = None, workers: int | None = None, large: bool = False) -> dict:
    """Render the instruct sub-corpus into ``<cfg.root>/instruct`` (its own ``manifest.jsonl`` with
    ``instruction``, ``condition``, ``rate``, ``semitones``, ``emphasis_word``, ``plain_text`` and
    ``neutral_id``); with ``large``, ``cfg.large_instruct`` English sentences of the large corpus into
    ``<cfg.large_root>/instruct``. Returns the summary written to its ``corpus.json``."""
    cfg = cfg or CorpusConfig()
    root, start = Path(cfg.large_root if large else cfg.root) / INSTRUCT_DIR, time.time()
    voices = [v for v in VOICES if engine_available(v.engine)]
    if large:
        jobs, skipped = plan_instruct(large_instruct_pools(read_large_texts(cfg.texts), cfg), voices, cfg,
                                      (("en", cfg.large_instruct),))
    else:
        jobs, skipped = plan_instruct(instruct_pools(read_texts(cfg.texts), cfg), voices, cfg)
    records, dropped = render_jobs(jobs, root, cfg.sample_rate, workers)
    kept = {r["id"] for r in records}      # an instructed rendering needs its neutral twin
    records = [r for r in records if r["neutral_id"] in kept]
    write_manifest(root, records)
    summary = corpus_stats(records)
    summary["fingerprint"] = corpus_fingerprint(root, records)
    per_condition: dict[str, dict] = {}
    for r in records:
        c = per_condition.setdefault(r["condition"], {"utterances": 0, "minutes": 0.0})
        c["utterances"] += 1
        c["minutes"] = round(c["minutes"] + r["duration"] / 60, 2)
    summary.update(per_condition=per_condition, skipped=skipped, dropped=dropped,
                   build_seconds=round(time.time() - start, 1))
    (root / "corpus.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False), encoding="utf-8")
    return summary


def corpus_fingerprint(root: str | Path, records: list[dict]) -> dict:
    """What identifies a build: the SHA-256 of ``manifest.jsonl`` and of every audio file, one
    SHA-256 over all of them (``sha256``), and the versions of the engines and audio libraries
    (:func:`minicosy.engines.engine_versions`). Equal fingerprints mean byte-identical corpora."""
    root = Path(root)
    files = {"manifest.jsonl": hashlib.sha256((root / "manifest.jsonl").read_bytes()).hexdigest()}
    for r in records:
        files[r["path"]] = hashlib.sha256((root / r["path"]).read_bytes()).hexdigest()
    whole = hashlib.sha256("".join(f"{k} {v}\n" for k, v in sorted(files.items())).encode()).hexdigest()
    return {"sha256": whole, "versions": engine_versions(), "files": files}


def load_manifest(root: str | Path = "data/corpus", split: str | None = None) -> list[dict]:
    """Manifest records, optionally of one split; a clear error if the corpus is not built."""
    path = Path(root) / "manifest.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: build the corpus with `python -m minicosy.data build`")
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if split is None or r["split"] == split]


def feature_cache(corpus_root: str | Path, name: str, records: list[dict],
                  compute: Callable[[dict], torch.Tensor]) -> dict[str, torch.Tensor]:
    """``compute(record)`` of each record, keyed by utterance id and cached in
    ``<corpus>/cache/<name>.pt``; a corpus that grew computes only what the cache lacks."""
    cache = Path(corpus_root) / "cache" / f"{name}.pt"
    table = torch.load(cache, weights_only=True) if cache.exists() else {}
    missing = [r for r in records if r["id"] not in table]
    for r in missing:
        table[r["id"]] = compute(r)
    if missing:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(table, cache)
    return table


def checkpoint_cache(corpus_root: str | Path, checkpoint: str | Path, key: str,
                     compute: Callable[[set[str] | None], dict], ids: Iterable[str] | None = None) -> dict:
    """A per-utterance table made by a model checkpoint, cached in
    ``<corpus>/cache/<key>_<checkpoint stem>.pt`` and recomputed (``compute(None)``: every
    utterance) when the checkpoint's content changes (its SHA-256, so that a fresh clone or a copied
    folder keeps a valid cache). Where ``ids`` are given and some are not in the cache (the corpus
    grew), only those are computed (``compute(missing)``) and added."""
    checkpoint = Path(checkpoint)
    cache = Path(corpus_root) / "cache" / f"{key}_{checkpoint.stem}.pt"
    stamp = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    table: dict = {}
    if cache.exists():
        cached = torch.load(cache, weights_only=True)
        if cached.get("stamp") == stamp:
            table = cached[key]
    missing = ({i for i in ids if i not in table} if ids is not None else set()) if table else None
    if missing == set():
        return table
    table.update(compute(missing))         # None: the whole table
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"stamp": stamp, key: table}, cache)
    return table


def corpus_stats(records: list[dict]) -> dict:
    """Utterance counts and hours per language, voice and split."""
    def hours(rs):
        return round(sum(r["duration"] for r in rs) / 3600, 3)

    def group(key):
        g = defaultdict(list)
        for r in records:
            g[r[key]].append(r)
        return {k: {"utterances": len(v), "hours": hours(v)} for k, v in sorted(g.items())}

    return {"utterances": len(records), "hours": hours(records), "voices": len({r["speaker"] for r in records}),
            "per_lang": group("lang"), "per_speaker": group("speaker"), "per_split": group("split")}


class CorpusDataset(torch.utils.data.Dataset):
    """Utterances of one split as dicts: id, text, lang, speaker, ``wav`` (float32 tensor), sr."""

    def __init__(self, root: str | Path = "data/corpus", split: str | None = "train",
                 langs: tuple[str, ...] | None = None, sample_rate: int | None = None):
        self.root = Path(root)
        self.records = [r for r in load_manifest(root, split) if langs is None or r["lang"] in langs]
        self.sample_rate = sample_rate

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        wav, sr = load_wav(self.root / r["path"], self.sample_rate)
        return {**r, "wav": torch.from_numpy(wav), "sr": sr}


def print_stats(summary: dict) -> None:
    print(f"{summary['utterances']} utterances, {summary['hours']:.2f} h, {summary['voices']} voices")
    for title, key in (("language", "per_lang"), ("voice", "per_speaker"), ("split", "per_split")):
        print(f"\nper {title}:")
        for name, s in summary[key].items():
            print(f"  {name:18s} {s['utterances']:5d} utt  {s['hours'] * 60:6.1f} min")


def print_instruct(summary: dict) -> None:
    print(f"\ninstruct sub-corpus: {summary['utterances']} utterances, {summary['hours'] * 60:.1f} min in "
          f"{summary['build_seconds']} s; per condition "
          + ", ".join(f"{k} {v['utterances']}" for k, v in summary["per_condition"].items()))
    for skip in summary["skipped"]:
        print(f"  {skip['condition']} not rendered by {skip['engine']}: {skip['reason']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minicosy.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="render the corpus")
    b.add_argument("--root", default=None, help=f"default {CorpusConfig.root} ({CorpusConfig.large_root} with --size large)")
    b.add_argument("--texts", default=CorpusConfig.texts, help="folder of the sentence files")
    b.add_argument("--workers", type=int, default=None)
    b.add_argument("--limit", type=int, default=None, help="at most N utterances per voice")
    b.add_argument("--force", action="store_true", help="rebuild over an existing corpus")
    b.add_argument("--if-missing", action="store_true", help="do nothing if the corpus exists")
    b.add_argument("--size", choices=("small", "large"), default="small",
                   help="large: the small corpus plus tens of thousands of English sentences (hours; resumable; "
                        "into --root, default data/corpus_large)")
    s = sub.add_parser("stats", help="print hours per language / voice / split")
    s.add_argument("--root", default=CorpusConfig.root)
    args = parser.parse_args(argv)
    if args.cmd == "build" and args.size == "large":
        cfg = CorpusConfig(large_root=args.root or CorpusConfig.large_root, texts=args.texts)
        summary = build_large(cfg, args.workers)
        print_stats(summary)
        print(f"\n{summary['sentences']} distinct sentences; fingerprint {summary['fingerprint']['sha256'][:16]}; "
              f"built in {summary['build_seconds']} s")
        if args.force or not (Path(cfg.large_root) / INSTRUCT_DIR / "manifest.jsonl").exists():
            print_instruct(build_instruct(cfg, args.workers, large=True))
    elif args.cmd == "build":
        args.root = args.root or CorpusConfig.root
        if args.if_missing and (Path(args.root) / "manifest.jsonl").exists():
            print(f"corpus already built under {args.root} (--force rebuilds it)")
        else:
            summary = build_corpus(CorpusConfig(root=args.root, texts=args.texts), args.workers, args.limit, args.force)
            print_stats(summary)
            print(f"\nfingerprint {summary['fingerprint']['sha256'][:16]}; built in {summary['build_seconds']} s; skipped engines: {summary['skipped_engines'] or 'none'}; "
                  f"dropped {len(summary['dropped'])} utterances outside {MIN_SECONDS}-{MAX_SECONDS} s")
        if args.limit is None and not (args.if_missing and (Path(args.root) / INSTRUCT_DIR / "manifest.jsonl").exists()):
            print_instruct(build_instruct(CorpusConfig(root=args.root, texts=args.texts), args.workers))
    else:
        print_stats(corpus_stats(load_manifest(args.root)))


if __name__ == "__main__":
    sys.exit(main())
