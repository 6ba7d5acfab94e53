"""DPO (eq. 13) on sequence log-probabilities of the LM."""
import math

import pytest
import torch

from minicosy.config import LMConfig, SpeechTokenizerConfig
from minicosy.lm import TextSpeechLM
from minicosy.rl import (asr_reward_loss, dpo_batch, dpo_loss, dpo_step_loss, gumbel_softmax, preference_pairs,
                         sequence_log_probs, speaker_prompt, tag_examples)
from minicosy.speech_tokenizer import SpeechTokenizer

TINY = LMConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def test_dpo_loss_by_hand():
    # β·((-10 + 11) - (-12 + 11)) = 0.5 · 2 = 1  ->  -log σ(1) = log(1 + e^-1)
    t = lambda v: torch.tensor([v])
    loss, stats = dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.5)
    assert float(loss) == pytest.approx(math.log1p(math.exp(-1)), abs=1e-6)
    assert stats == {"margin": pytest.approx(1.0), "accuracy": 1.0}
    # equal policy and reference: log 2, whatever the sequences' probabilities
    assert float(dpo_loss(t(-3.0), t(-9.0), t(-3.0), t(-9.0))[0]) == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(t(0.0), t(0.0), t(0.0), t(0.0), beta=0)
    with pytest.raises(ValueError, match="same shape"):
        dpo_loss(t(0.0), torch.zeros(2), t(0.0), t(0.0))


def test_sequence_log_probs_sum_speech_positions_only_and_train_the_policy():
    torch.manual_seed(0)
    lm = TextSpeechLM(TINY, 50)
    text, speech = torch.randint(0, 50, (2, 4)), torch.randint(0, 6561, (2, 6))
    text_len, speech_len = torch.tensor([4, 3]), torch.tensor([6, 2])
    logp = sequence_log_probs(lm, text, text_len, speech, speech_len)
    # by hand: utterance 1 = [sos, 3 text ids, task_id, 2 speech]; targets = 2 speech tokens + EOS
    rows = torch.cat([lm.llm_embedding.weight[:1], lm.embed_text(text[1, :3]), lm.llm_embedding.weight[1:2],
                      lm.embed_speech(speech[1, :2])])[None]
    step_logp = lm.llm_decoder(lm.llm(rows)).log_softmax(-1)[0]
    targets = speech[1, :2].tolist() + [6561]
    by_hand = sum(step_logp[4 + k, tok] for k, tok in enumerate(targets))   # predicted from task_id (row 4) on
    assert float(logp[1].detach()) == pytest.approx(float(by_hand.detach()), abs=1e-4)
    # the loss reaches the policy; the reference (detached) gets no gradient
    ref = TextSpeechLM(TINY, 50)
    ref.load_state_dict(lm.state_dict())
    ref.requires_grad_(False)
    with torch.no_grad():
        ref_logp = sequence_log_probs(ref, text, text_len, speech, speech_len)
    loss, _ = dpo_loss(logp[:1], logp[1:], ref_logp[:1], ref_logp[1:])
    assert float(loss.detach()) == pytest.approx(math.log(2), abs=1e-5)          # policy == reference
    loss.backward()
    assert lm.llm_decoder.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in ref.parameters())


def test_speaker_prompt_tags():
    assert speaker_prompt("Speaker A") == "Speaker A<|endofprompt|>"
    assert speaker_prompt(None) == speaker_prompt() == "unknown<|endofprompt|>"
    for bad in ("", "  ", "a<|endofprompt|>"):
        with pytest.raises(ValueError, match="speaker label"):
            speaker_prompt(bad)


def _tokenizer() -> SpeechTokenizer:
    cfg = SpeechTokenizerConfig(d_model=32, n_heads=2, encoder1_layers=1, encoder2_layers=1)
    return SpeechTokenizer(cfg, list("abcdefg"))


def test_gumbel_softmax_is_a_seeded_relaxed_one_hot():
    logits = torch.tensor([[0.0, 5.0, -5.0]])
    a = gumbel_softmax(logits, 0.5, torch.Generator().manual_seed(1))
    b = gumbel_softmax(logits, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and torch.allclose(a.sum(-1), torch.ones(1))
    hard = gumbel_softmax(logits.expand(2000, 3) * 1.0, 1e-3, torch.Generator().manual_seed(0))
    share = hard.argmax(-1).bincount(minlength=3).float() / 2000           # samples follow softmax(logits)
    assert torch.allclose(share, logits.softmax(-1)[0], atol=0.03)
    with pytest.raises(ValueError, match="tau"):
        gumbel_softmax(logits, 0.0)


def test_asr_reward_reaches_the_lm_and_leaves_the_tokenizer_frozen():
    torch.manual_seed(0)
    lm, tok = TextSpeechLM(TINY, 50), _tokenizer()
    text, speech = torch.randint(0, 50, (2, 4)), torch.randint(0, 6561, (2, 12))
    text_len, speech_len = torch.tensor([4, 3]), torch.tensor([12, 9])
    units, unit_len = torch.tensor([[1, 2, 3], [4, 5, 0]]), torch.tensor([3, 2])
    before = {k: v.clone() for k, v in tok.state_dict().items()}
    opt = torch.optim.SGD(list(lm.parameters()) + list(tok.parameters()), lr=0.1)
    loss = asr_reward_loss(lm, tok, text, text_len, speech, speech_len, units, unit_len,
                           generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    lm_grads = [p.grad for p in lm.parameters() if p.grad is not None]
    assert lm_grads and sum(float(g.abs().sum()) for g in lm_grads) > 0
    assert lm.llm_decoder.weight.grad[:6561].abs().sum() > 0             # through the speech-code logits
    assert all(p.grad is None and not p.requires_grad for p in tok.parameters())
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in tok.state_dict().items())
    # the soft path agrees with the hard one for a one-hot distribution (eq. 14)
    codes = torch.randint(0, 6561, (1, 5))
    onehot = torch.nn.functional.one_hot(codes, 6561).float()
    torch.testing.assert_close(tok.quantizer.decode_soft(onehot), tok.quantizer.decode(codes))
    with pytest.raises(ValueError, match="FSQ tokenizer"):
        asr_reward_loss(lm, SpeechTokenizer(tok.cfg, tok.vocab, "vq"), text, text_len, speech, speech_len, units, unit_len)


def test_tag_examples_prefix_the_speaker_tag():
    class Tok:  # characters as ids, '<|endofprompt|>' as one id
        def encode(self, text, normalize=False):
            head, _, _ = text.partition("<|endofprompt|>")
            return [ord(c) % 50 for c in head] + [49]

    ex = [{"speaker": "a", "text": torch.tensor([1, 2])}, {"speaker": "b", "text": torch.tensor([3])}]
    tagged = tag_examples(ex, Tok(), {"a": "Speaker A"})
    assert tagged[0]["text"].tolist() == Tok().encode("Speaker A<|endofprompt|>") + [1, 2]
    assert tagged[1]["text"].tolist() == Tok().encode("unknown<|endofprompt|>") + [3]
    assert [t["tag"] for t in tagged] == ["Speaker A", "unknown"] and ex[0]["text"].tolist() == [1, 2]


def test_preference_pairs_rank_by_wer_then_similarity():
    cands = {"t1": [{"speech": [1], "wer": 0.5, "sim": 0.7}, {"speech": [2], "wer": 0.2, "sim": 0.6},
                    {"speech": [3], "wer": 0.2, "sim": 0.9}, {"speech": [4], "wer": 0.9, "sim": 0.95}],
             "t2": [{"speech": [5], "wer": 0.4, "sim": 0.5}, {"speech": [6], "wer": 0.4, "sim": 0.5}],
             "t3": [{"speech": [7], "wer": 0.0, "sim": 0.5}]}
    pairs = preference_pairs(cands)
    assert [(p["key"], p["chosen"], p["rejected"]) for p in pairs] == [("t1", [3], [4])]    # ties and singles skipped


def test_dpo_step_starts_at_log_2_and_moves_towards_the_chosen_sequence():
    torch.manual_seed(0)
    policy, reference = TextSpeechLM(TINY, 50), TextSpeechLM(TINY, 50)
    reference.load_state_dict(policy.state_dict())
    reference.requires_grad_(False)
    pairs = [{"key": "a", "chosen": [5, 6, 7, 8], "rejected": [9, 9, 9]},
             {"key": "b", "chosen": [1, 2], "rejected": [3, 4, 5, 6, 7]}]
    batch = dpo_batch(pairs, {"a": torch.tensor([1, 2, 3]), "b": torch.tensor([4, 5])})
    assert batch["speech_token"].shape == (4, 5) and batch["speech_token_len"].tolist() == [4, 2, 3, 5]
    opt = torch.optim.Adam(policy.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = dpo_step_loss(policy, reference, batch, beta=0.5)
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5) and losses[-1] < losses[0] - 0.1
    assert all(p.grad is None for p in reference.parameters())
