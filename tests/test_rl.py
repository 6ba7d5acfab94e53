"""DPO (eq. 13) on sequence log-probabilities of the LM."""
import math

import pytest
import torch

from minicosy.config import LMConfig
from minicosy.lm import TextSpeechLM
from minicosy.rl import dpo_loss, sequence_log_probs

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
