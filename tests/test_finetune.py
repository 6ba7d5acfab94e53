"""Fine-tuning data and loops (§2.7-2.8): mSFT tags, ASR-reward fine-tuning, sampled candidates
scored by independent judges, and DPO training against a frozen reference."""
import math

import pytest
import torch

from minicosy.config import LMConfig, SpeechTokenizerConfig
from minicosy.finetune import (finetune_lm, msft_labels, sample_candidates, score_candidates, train_dpo,
                               with_units)
from minicosy.lm import TextSpeechLM
from minicosy.speech_tokenizer import SpeechTokenizer
from minicosy.train import TrainConfig


TINY = LMConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _examples(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"id": f"u{seed}-{i}", "speaker": "s", "lang": "en", "text": torch.randint(0, 50, (4,), generator=g),
             "speech": torch.randint(0, 6561, (10,), generator=g)} for i in range(n)]


def test_msft_labels():
    assert msft_labels(["b", "a"]) == {"a": "Speaker A", "b": "Speaker B"}
    with pytest.raises(ValueError, match="26"):
        msft_labels([str(i) for i in range(27)])


def test_asr_reward_fine_tuning_trains_the_lm_only():
    torch.manual_seed(0)
    lm = TextSpeechLM(TINY, 50)
    tok = SpeechTokenizer(SpeechTokenizerConfig(d_model=32, n_heads=2, encoder1_layers=1, encoder2_layers=1),
                          ["AE", "AH", "B", "D", "EY", "F", "K", "▁"])
    examples = _examples(8)
    records = {ex["id"]: {"text": "a bad cafe", "lang": "en"} for ex in examples}
    examples = with_units(examples, records, tok)
    assert examples[0]["units"].tolist() == [2, 8, 3, 1, 4, 8, 7, 2, 6, 5]       # AH ▁ B AE D ▁ K AH F EY
    before_lm = {k: v.clone() for k, v in lm.state_dict().items()}
    before_tok = {k: v.clone() for k, v in tok.state_dict().items()}
    tcfg = TrainConfig(lr=1e-3, max_steps=4, warmup_steps=1, threads=1, log_every=1)
    log = finetune_lm(lm, examples, tcfg, max_rows=80, asr=(tok, 0.5))
    assert len(log.losses) == 4 and all(math.isfinite(v) for v in log.losses)
    assert any(not torch.equal(v, before_lm[k]) for k, v in lm.state_dict().items())
    assert all(torch.equal(v, before_tok[k]) for k, v in tok.state_dict().items())
    with pytest.raises(ValueError, match="units"):
        finetune_lm(lm, _examples(2), tcfg, asr=(tok, 0.5))


def test_dpo_training_prefers_the_chosen_sequences():
    torch.manual_seed(0)
    lm = TextSpeechLM(TINY, 50)
    start = {k: v.clone() for k, v in lm.state_dict().items()}
    pairs = [{"key": f"t{i}", "chosen": [i, i + 1, i + 2], "rejected": [7, 7, 7, 7]} for i in range(4)]
    texts = {f"t{i}": torch.tensor([i + 1, i + 2]) for i in range(4)}
    log = train_dpo(lm, pairs, texts, TrainConfig(lr=2e-3, max_steps=12, warmup_steps=1, threads=1, log_every=1),
                    beta=0.5, pairs_per_batch=2)
    assert log.losses[0] == pytest.approx(math.log(2), abs=1e-4) and log.losses[-1] < log.losses[0]
    assert any(not torch.equal(v, start[k]) for k, v in lm.state_dict().items())
    with pytest.raises(ValueError, match="no preference pairs"):
        train_dpo(lm, [], texts, TrainConfig(max_steps=1))


def test_candidates_are_sampled_and_scored(corpus_root):
    from minicosy.audio import load_wav
    from minicosy.data import load_manifest
    from minicosy.eval import SpeakerEncoder, SphinxASR
    from minicosy.pipeline import CosyVoice2

    tts = CosyVoice2.from_pretrained("tiny")
    prompt = next(r for r in load_manifest(corpus_root, "heldout") if r["lang"] == "en" and 2 < r["duration"] < 5)
    wav, sr = load_wav(corpus_root / prompt["path"])
    text = "We walk to the park."
    cands = sample_candidates(tts, text, (wav, sr), k=2, seed=0)
    again = sample_candidates(tts, text, (wav, sr), k=2, seed=0)
    assert len(cands) == 2 and [c["speech"] for c in cands] == [c["speech"] for c in again]
    assert cands[0]["speech"] != cands[1]["speech"]                              # different seeds, different samples
    for c in cands:
        assert all(0 <= t < 6561 for t in c["speech"]) and len(c["wav"]) == 2 * 480 * len(c["speech"])
    scored = score_candidates(cands, text, wav, sr, SphinxASR(), SpeakerEncoder())
    assert all(s["wer"] >= 0 and -1 <= s["sim"] <= 1 and s["speech"] == c["speech"] for s, c in zip(scored, cands))


def test_dpo_recipe_keeps_the_best_held_out_weights_and_writes_a_model_folder(corpus_root, tmp_path):
    import json

    from minicosy.pipeline import CosyVoice2
    from minicosy.train import main

    out, cache = tmp_path / "dpo" / "lm.pt", tmp_path / "candidates.pt"
    args = ["dpo", "--model", "tiny", "--corpus", str(corpus_root), "--texts", "2", "--val-texts", "1", "--k", "2",
            "--minutes", "0.1", "--validate-minutes", "0.02", "--check-recordings", "2", "--threads", "1",
            "--candidates", str(cache), "--out", str(out)]
    main(args)
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["pairs"]["train"]["texts"] == 2 and card["pairs"]["val"]["texts"] == 1
    assert card["pairs"]["train"]["candidates"] == 4 and 0 <= card["pairs"]["train"]["mean_wer"]
    extra = torch.load(out, weights_only=True)["log"]["extra"]
    assert extra["validation"] and extra["best_validation"] == min(v[2] for v in extra["validation"])
    tuned, base = CosyVoice2.from_pretrained(tmp_path / "dpo"), CosyVoice2.from_pretrained("tiny")
    assert all(torch.equal(a, b) for a, b in zip(tuned.flow.state_dict().values(), base.flow.state_dict().values()))
    assert any(not torch.allclose(a.float(), b.float()) for a, b in zip(tuned.lm.state_dict().values(),
                                                                          base.lm.state_dict().values()))
    saved = torch.load(cache, weights_only=True)
    assert len(saved["ids"]) == 3 and all(len(c) == 2 for c in saved["scored"].values())
    with pytest.raises(ValueError, match="other texts, k or seed"):      # the cache answers only its own question
        main(args[:6] + ["3"] + args[7:])                                  # --texts 3
