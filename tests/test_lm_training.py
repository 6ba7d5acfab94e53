"""Training recipe of the text-speech LM (§2.3): corpus pairs, batches, metrics, checkpoints."""
import json
import math
import random
from dataclasses import replace

import pytest
import torch

from minicosy import lm_train as lm_module
from minicosy.config import LMConfig
from minicosy.lm import TextSpeechLM
from minicosy.lm_train import (collate_lm, evaluate_lm, lm_batches, lm_examples, prompt_pairs, train_lm,
                               unigram_perplexity)
from minicosy.text_tokenizer import TextTokenizer
from minicosy.train import TrainConfig, main

from .conftest import ROOT

TINY = LMConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


pytestmark = pytest.mark.usefixtures("single_thread")


def _examples(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 12, (n,), generator=g).tolist()
    return [{"id": f"u{i}", "text": torch.randint(0, 100, (t,), generator=g),
             "speech": torch.randint(0, 50, (4 * t,), generator=g)} for i, t in enumerate(lengths)]


def test_lm_examples_pair_normalised_text_with_speech_tokens():
    tok = TextTokenizer.from_pretrained(ROOT / "data" / "checkpoints" / "text_tokenizer")
    records = [{"id": "a", "text": "I have 3 cats.", "speaker": "s", "lang": "en"},
               {"id": "b", "text": "No tokens for me.", "speaker": "s", "lang": "en"},
               {"id": "c", "text": "   ", "speaker": "s", "lang": "en"}]
    tokens = {"a": torch.arange(30, dtype=torch.int16), "c": torch.arange(5, dtype=torch.int16)}
    out = lm_examples(records, tok, tokens)
    assert [e["id"] for e in out] == ["a"]                      # no speech tokens / no text: left out
    assert out[0]["text"].tolist() == tok.encode("I have three cats.")
    assert out[0]["speech"].dtype == torch.long and len(out[0]["speech"]) == 30


def test_batches_cover_every_example_once_per_epoch_within_the_row_budget():
    examples = _examples(40)
    batches = lm_batches(examples, max_rows=200, rng=random.Random(0))
    seen = []
    while len(seen) < len(examples):
        b = next(batches)
        assert b["text_token"].size(0) == 1 or b["text_token"].size(0) * (
            int(b["text_token_len"].max()) + int(b["speech_token_len"].max()) + 3) <= 220
        for text, n in zip(b["text_token"], b["text_token_len"]):
            seen.append(tuple(text[:n].tolist()))
    assert sorted(seen) == sorted(tuple(e["text"].tolist()) for e in examples)


def test_evaluate_counts_speech_targets_only():
    torch.manual_seed(0)
    lm = TextSpeechLM(TINY, 100).eval()
    examples = _examples(5)
    m = evaluate_lm(lm, examples, batch_size=2)
    assert m["tokens"] == sum(len(e["speech"]) for e in examples)   # no EOS, no fill
    out = lm(**collate_lm(examples), bistream=False)
    keep = (out["target"] >= 0) & (out["target"] < 6561)
    nll = torch.nn.functional.cross_entropy(out["logits"][keep], out["target"][keep])
    assert m["perplexity"] == pytest.approx(math.exp(nll.item()), rel=1e-4)
    assert m["accuracy"] == pytest.approx((out["logits"][keep].argmax(-1) == out["target"][keep]).float().mean().item())
    bi = evaluate_lm(lm, examples, bistream=True)
    assert bi["tokens"] == m["tokens"]                               # fill targets excluded


def test_unigram_baseline():
    train = [{"speech": torch.zeros(99, dtype=torch.long)}]
    held = [{"speech": torch.zeros(3, dtype=torch.long)}]
    assert unigram_perplexity(train, held, vocab=11) == pytest.approx(110 / 100)
    assert unigram_perplexity(train, [{"speech": torch.ones(1, dtype=torch.long)}], vocab=11) == pytest.approx(110)


def test_a_few_steps_learn_and_the_checkpoint_round_trips(tmp_path):
    train, held = _examples(24), _examples(6, seed=1)
    tcfg = TrainConfig(lr=3e-3, max_steps=30, warmup_steps=2, threads=1, log_every=1)
    lm, metrics = train_lm(train, held, TINY, 100, tcfg, max_rows=400, out=tmp_path / "lm.pt")
    ckpt = torch.load(tmp_path / "lm.pt", weights_only=False)
    assert ckpt["log"]["losses"][-1] < ckpt["log"]["losses"][0]
    assert set(metrics) >= {"unistream", "bistream", "unigram_perplexity"}
    card = json.loads((tmp_path / "lm.json").read_text())
    assert card["model_config"]["text_vocab_size"] == 100 and card["metrics"]["unistream"]["tokens"] > 0
    loaded = TextSpeechLM.from_checkpoint(tmp_path / "lm.pt")
    assert loaded.cfg == TINY and not loaded.training
    lm.half().float()                                                 # the checkpoint stores float16
    batch = collate_lm(held)
    torch.testing.assert_close(loaded(**batch, bistream=False)["logits"], lm(**batch, bistream=False)["logits"])
    gen = [list(m.inference([1, 2, 3], sampling="greedy", max_token_text_ratio=3)) for m in (lm, loaded)]
    assert gen[0] == gen[1]


def test_init_starts_from_a_checkpoint_and_may_change_the_mix_ratio(tmp_path):
    """``train_lm(init=...)`` (``train lm --init``) starts from the checkpoint's weights: zero steps
    keep them exactly (a new mix ratio is no weight); a checkpoint of other sizes is a ValueError."""
    train, held = _examples(12), _examples(4, seed=1)
    train_lm(train, held, TINY, 100, TrainConfig(max_steps=5, warmup_steps=1, threads=1), max_rows=400,
             out=tmp_path / "a.pt")
    mixed = replace(TINY, mix_ratio=(2, 3))
    lm, _ = train_lm(train, held, mixed, 100, TrainConfig(max_steps=0, threads=1), max_rows=400,
                     out=tmp_path / "b.pt", init=tmp_path / "a.pt")
    first = TextSpeechLM.from_checkpoint(tmp_path / "a.pt")
    assert all(torch.equal(v, first.state_dict()[k]) for k, v in lm.state_dict().items())
    card = json.loads((tmp_path / "b.json").read_text())
    assert card["init"] == str(tmp_path / "a.pt") and card["model_config"]["cfg"]["mix_ratio"] == [2, 3]
    with pytest.raises(ValueError, match="--init"):
        train_lm(train, held, TINY, 120, TrainConfig(max_steps=0, threads=1), init=tmp_path / "a.pt")


def test_recipe_runs_through_the_train_cli(tmp_path, monkeypatch):
    calls = []

    def fake_examples(root, splits, tok, ckpt, augmented_copy=0):
        calls.append((str(root), tuple(splits), augmented_copy))
        return _examples(12 if "train" in splits else 3, seed=len(splits))

    monkeypatch.setattr(lm_module, "corpus_examples", fake_examples)
    corpus = tmp_path / "corpus"
    (corpus / "instruct").mkdir(parents=True)
    (corpus / "instruct" / "manifest.jsonl").write_text("")
    out = tmp_path / "lm_tiny.pt"
    main(["lm", "--corpus", str(corpus), "--minutes", "0.01", "--validate-minutes", "0.002", "--out", str(out),
          "--max-rows", "300", "--augmented-copies", "1"])
    assert (str(corpus / "instruct"), ("train",), 0) in calls           # the instruct sub-corpus is mixed in
    assert (str(corpus), ("train",), 1) in calls                       # and one augmented copy of the train split
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["model_config"]["cfg"]["hidden_size"] == 128 and card["train_config"]["max_minutes"] == 0.01
    assert card["metrics"]["train_utterances"] == 2 * 12 + 2 * 12 and "best_validation" in card["metrics"]
    with pytest.raises(FileNotFoundError, match="instruct"):
        main(["lm", "--corpus", str(tmp_path / "bare"), "--minutes", "0.01", "--out", str(out)])


def test_prompt_pairs_put_a_same_voice_utterance_in_front():
    """Zero-shot continuations for training: text before text, speech before speech, the prompt
    another utterance of the same voice and language, instruct examples never paired."""
    def ex(i: int, speaker: str, lang: str = "en", instruct: bool = False) -> dict:
        return {"id": f"u{i}", "speaker": speaker, "lang": lang, "instruct": instruct,
                "text": torch.tensor([i, i]), "speech": torch.full((i + 1,), i)}

    examples = [ex(1, "a"), ex(2, "a"), ex(3, "a"), ex(4, "b"), ex(5, "c"), ex(6, "c", "zh"), ex(7, "a", instruct=True)]
    pairs = prompt_pairs(examples, 1.0, random.Random(0))
    assert sorted(p["id"].split("+")[1] for p in pairs) == ["u1", "u2", "u3"]     # b, c: no second utterance
    by_id = {e["id"]: e for e in examples}
    for p in pairs:
        prompt, target = (by_id[k] for k in p["id"].split("+"))
        assert prompt is not target and prompt["speaker"] == target["speaker"] and not prompt["instruct"]
        assert torch.equal(p["text"], torch.cat([prompt["text"], target["text"]]))
        assert torch.equal(p["speech"], torch.cat([prompt["speech"], target["speech"]]))
    assert [p["id"] for p in prompt_pairs(examples, 1.0, random.Random(0))] == [p["id"] for p in pairs]
    assert prompt_pairs(examples, 0.0, random.Random(0)) == []
    half = prompt_pairs([ex(i, "a") for i in range(400)], 0.5, random.Random(1))
    assert 160 < len(half) < 240
    with pytest.raises(ValueError, match="share of prompt pairs"):
        prompt_pairs(examples, 1.5, random.Random(0))
