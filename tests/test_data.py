"""The shipped sentences, the deterministic corpus plan, a small real build, and the built corpus."""
import json
import os
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import soundfile as sf
import torch

from minicosy.config import CorpusConfig
from minicosy.data import (LANGS, MORE_TIER, CorpusDataset, build_corpus, build_large, checkpoint_cache, corpus_stats, feature_cache,
                           load_manifest, plan_corpus, read_large_texts, read_texts, render_jobs, sentence_split)
from minicosy.engines import VOICES, engine_available, synthesize

from .conftest import ROOT

TEXTS = ROOT / "data" / "texts"
FIELDS = {"id", "text", "lang", "speaker", "engine", "gender", "path", "duration", "sample_rate", "split"}


def test_shipped_sentences():
    texts = read_texts(TEXTS)
    minimum = {"en": 600, "zh": 400, "ja": 150, "ko": 100}
    for lang, n in minimum.items():
        assert len(texts[lang]) >= n, lang
        assert len(set(texts[lang])) == len(texts[lang]), f"duplicate {lang} sentences"
    en = texts["en"]
    assert sum(bool(re.search(r"\d", s)) for s in en) >= 100              # numbers
    assert sum(s.endswith("?") for s in en) >= 100                        # questions
    assert sum(bool(re.search(r"\d", s)) for s in texts["zh"]) >= 40
    assert not any(re.search(r"[A-Za-z]", s) for lang in ("zh", "ja", "ko") for s in texts[lang])


def test_plan_is_deterministic_and_keeps_heldout_voices_out_of_training():
    cfg = CorpusConfig(texts=str(TEXTS))
    texts = read_texts(TEXTS)
    a, b = plan_corpus(texts, VOICES, cfg), plan_corpus(texts, VOICES, cfg)
    assert [(j.id, j.split) for j in a] == [(j.id, j.split) for j in b]
    assert len({j.id for j in a}) == len(a)
    heldout = {v.name for v in VOICES if v.heldout}
    assert heldout and all((j.split == "heldout") == (j.voice.name in heldout) for j in a)
    # every rendering of one sentence lands in the same split (no text leaks from train to test)
    by_sentence = {}
    for j in a:
        if j.split != "heldout":
            assert by_sentence.setdefault(j.id.split("-")[-1], j.split) == j.split
    splits = Counter(sentence_split(f"en{i:04d}", cfg) for i in range(1000))
    assert 20 < splits["dev"] < 90 and 20 < splits["test"] < 90
    assert plan_corpus(texts, VOICES, CorpusConfig(seed=7)) != a


def test_voices_cover_languages_and_engines():
    assert len(VOICES) >= 12
    assert {v.lang for v in VOICES} == set(LANGS)
    assert len({v.name for v in VOICES}) == len(VOICES)
    assert {v.engine for v in VOICES} == {"flite", "espeak", "hibari", "piper", "openjtalk"}


def test_empty_text_is_refused():
    with pytest.raises(ValueError, match="empty"):
        synthesize(VOICES[0], "   ")


def test_small_build(tmp_path, monkeypatch):
    available = [v for v in VOICES if engine_available(v.engine)]
    if len(available) < 8:
        pytest.skip("fewer than 8 voices' engines installed")
    cfg = CorpusConfig(root=str(tmp_path / "corpus"), texts=str(TEXTS))
    summary = build_corpus(cfg, workers=2, limit=1)
    records = load_manifest(cfg.root)
    assert len(records) == len(available) == summary["utterances"]
    for r in records:
        assert set(r) == FIELDS
        info = sf.info(tmp_path / "corpus" / r["path"])
        assert info.samplerate == 24000 and info.channels == 1
        assert abs(info.duration - r["duration"]) < 1e-3
    with pytest.raises(FileExistsError):
        build_corpus(cfg)
    # a build that ends with too few voices fails clearly
    monkeypatch.setattr("minicosy.data.engine_available", lambda engine: engine == "flite")
    with pytest.raises(RuntimeError, match="only 4 voices"), pytest.warns(UserWarning, match="not installed"):
        build_corpus(CorpusConfig(root=str(tmp_path / "few"), texts=str(TEXTS)), workers=1, limit=1)


def test_build_is_deterministic(tmp_path):
    """Two builds of a slice (two utterances per voice; one process, then two) are byte-identical,
    each run with a fresh home folder as on a new machine: libpulse then creates its runtime folder, which
    re-seeded espeak-ng's noise before the engines were driven deterministically; piper's ONNX
    noise depended on what the process had rendered before."""
    if len([v for v in VOICES if engine_available(v.engine)]) < 8:
        pytest.skip("fewer than 8 voices' engines installed")
    prints = []
    for run, workers in (("a", "1"), ("b", "2")):
        home = tmp_path / f"home_{run}"
        home.mkdir()
        env = {**os.environ, "HOME": str(home)}
        env.pop("XDG_RUNTIME_DIR", None)
        env.pop("PULSE_RUNTIME_PATH", None)
        root = tmp_path / f"corpus_{run}"
        subprocess.run([sys.executable, "-m", "minicosy.data", "build", "--root", str(root), "--limit", "2",
                        "--workers", workers, "--texts", str(TEXTS)], check=True, env=env, capture_output=True)
        prints.append(json.loads((root / "corpus.json").read_text())["fingerprint"])
        records = load_manifest(root)
        assert set(prints[-1]["files"]) == {"manifest.jsonl"} | {r["path"] for r in records}
    assert {r["engine"] for r in load_manifest(tmp_path / "corpus_a")} >= {"espeak", "piper"}
    differ = sorted(k for k in prints[0]["files"] if prints[0]["files"][k] != prints[1]["files"].get(k))
    assert not differ, f"files that differ between two builds: {differ}"
    assert prints[0]["sha256"] == prints[1]["sha256"]
    assert prints[0]["versions"]["espeak-ng"] and prints[0]["versions"]["piper-tts"]


def test_load_manifest_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="build the corpus"):
        load_manifest(tmp_path)


def test_built_corpus(corpus_root):
    records = load_manifest(corpus_root)
    stats = corpus_stats(records)
    summary = json.loads((corpus_root / "corpus.json").read_text())
    print(f"\ncorpus: {stats['hours']:.2f} h, {stats['voices']} voices, built in {summary['build_seconds']} s, "
          f"skipped engines {summary['skipped_engines']}")
    for lang, s in stats["per_lang"].items():
        print(f"  {lang}: {s['hours'] * 60:.1f} min, {s['utterances']} utterances")
    assert stats["voices"] >= 12 and len(stats["per_lang"]) >= 3
    assert 1.2 <= stats["hours"] <= 2.5
    assert summary["build_seconds"] > 0       # its time is printed by the build (no timed unit tests: a loaded machine is slower)
    assert {r["split"] for r in records} == {"train", "dev", "test", "heldout"}
    assert all(1.0 <= r["duration"] <= 15.0 and r["sample_rate"] == 24000 for r in records)
    train_speakers = {r["speaker"] for r in records if r["split"] == "train"}
    assert not train_speakers & {r["speaker"] for r in records if r["split"] == "heldout"}
    ds = CorpusDataset(corpus_root, split="dev", langs=("en",))
    item = ds[0]
    assert item["sr"] == 24000 and item["lang"] == "en"
    assert abs(len(item["wav"]) / 24000 - item["duration"]) < 1e-3
    assert 0.85 < float(np.abs(item["wav"].numpy()).max()) < 0.95      # peak-normalised to 0.9


def test_large_texts_leave_the_evaluation_sentences_unseen():
    """The large corpus' sentences are distinct, and none is one of the project's own sentences
    (whose dev/test share are the evaluation sentences of every voice set)."""
    key = lambda s: re.sub(r"[^a-z ]", "", s.lower()).strip()  # noqa: E731
    large = read_large_texts(TEXTS)
    assert set(large) == {"wordnet", "bible"} and sum(map(len, large.values())) >= 20000
    keys = [key(s) for sentences in large.values() for s in sentences]
    assert len(set(keys)) == len(keys)
    assert not set(keys) & {key(s) for s in read_texts(TEXTS)["en"]}


def test_large_build_is_resumable(tmp_path, monkeypatch):
    """An interrupted large build, restarted, ends byte-identical to an uninterrupted one (the
    small corpus' part of the plan is left out here to keep the test short)."""
    if not all(engine_available(e) for e in ("flite", "espeak", "piper", "hibari")):
        pytest.skip("the English engines are not all installed")
    monkeypatch.setattr("minicosy.data.plan_corpus", lambda *args, **kwargs: [])
    cfg = dict(texts=str(TEXTS), large_voices=(("flite_slt", 3), ("piper_joe", 2)), large_thin=1, large_eval=1,
               large_more=(), large_more_thin=0)
    whole = build_large(CorpusConfig(large_root=str(tmp_path / "whole"), **cfg), workers=1, chunk=3)
    records = load_manifest(tmp_path / "whole")
    english = [v for v in VOICES if v.lang == "en"]
    thin = [v for v in english if not v.heldout and v.name not in ("flite_slt", "piper_joe")]
    assert len(records) + len(whole["dropped"]) == 3 + 2 + len(thin) + len(english)
    training = [r for r in records if r["split"] != "eval"]
    assert len({r["text"] for r in training}) == len(training) and {r["split"] for r in training} <= {"train", "dev"}
    evaluation = [r for r in records if r["split"] == "eval"]        # one sentence, read by every English voice
    assert len({r["text"] for r in evaluation}) == 1 and not {r["text"] for r in evaluation} & {r["text"] for r in training}

    real_render = render_jobs
    calls = []

    def interrupted(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real_render(*args, **kwargs)

    monkeypatch.setattr("minicosy.data.render_jobs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_large(CorpusConfig(large_root=str(tmp_path / "resumed"), **cfg), workers=1, chunk=3)
    assert len((tmp_path / "resumed" / "manifest.partial.jsonl").read_text().splitlines()) == 3
    monkeypatch.setattr("minicosy.data.render_jobs", real_render)
    resumed = build_large(CorpusConfig(large_root=str(tmp_path / "resumed"), **cfg), workers=1, chunk=3)
    assert resumed["fingerprint"]["sha256"] == whole["fingerprint"]["sha256"]
    assert not (tmp_path / "resumed" / "manifest.partial.jsonl").exists()

    rendered = []

    def counted(jobs, *args, **kwargs):
        rendered.extend(jobs)
        return real_render(jobs, *args, **kwargs)

    monkeypatch.setattr("minicosy.data.render_jobs", counted)      # a finished build that the plan grew
    cfg.update(large_more=(("flite_slt", 2),), large_more_thin=1)
    build_large(CorpusConfig(large_root=str(tmp_path / "whole"), **cfg), workers=1, chunk=3)
    grown = {r["id"]: r for r in load_manifest(tmp_path / "whole")}
    assert len(rendered) == 2 + len(thin)              # only the new sentences were rendered
    assert all(grown[r["id"]] == r for r in records)    # every earlier utterance and split as it was
    new = [r for r in grown.values() if r["id"] not in {q["id"] for q in records}]
    assert {r["split"] for r in new} == {"train"} and not {r["text"] for r in new} & {r["text"] for r in records}
    assert all(r[MORE_TIER] for r in new) and not any(MORE_TIER in r for r in records)


def test_checkpoint_cache_grows_with_the_corpus(tmp_path):
    """A table cached per checkpoint computes everything once, then only the utterances a grown
    corpus added, and everything again when the checkpoint's content changes."""
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"weights v1")
    calls = []

    def compute(only):
        calls.append(None if only is None else sorted(only))
        return {i: torch.tensor(len(calls)) for i in (only if only is not None else ("a", "b"))}

    assert set(checkpoint_cache(tmp_path, ckpt, "t", compute, ["a", "b"])) == {"a", "b"}
    assert checkpoint_cache(tmp_path, ckpt, "t", compute, ["a", "b"])["a"] == 1 and calls == [None]
    grown = checkpoint_cache(tmp_path, ckpt, "t", compute, ["a", "b", "c"])
    assert calls == [None, ["c"]] and (grown["a"], grown["c"]) == (1, 2)
    ckpt.write_bytes(b"weights v2")
    assert set(checkpoint_cache(tmp_path, ckpt, "t", compute, ["a", "b"])) == {"a", "b"} and calls[-1] is None
    records = [{"id": "x"}, {"id": "y"}]
    seen = []
    feature_cache(tmp_path, "f", records[:1], lambda r: seen.append(r["id"]) or torch.zeros(1))
    table = feature_cache(tmp_path, "f", records, lambda r: seen.append(r["id"]) or torch.ones(1))
    assert seen == ["x", "y"] and float(table["x"]) == 0 and float(table["y"]) == 1
