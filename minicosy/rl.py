"""Preference optimisation of the text-speech LM (§2.8, eq. 13): DPO on sequence log-probabilities.

    L_DPO = -log σ( β·log π_θ(μ^w|y)/π_ref(μ^w|y) - β·log π_θ(μ^l|y)/π_ref(μ^l|y) )

μ^w / μ^l are the preferred / rejected speech-token sequences for the text y (ranked by WER and
speaker similarity), π_ref a frozen copy of the starting LM. Log-probabilities are summed over the
speech positions of the unified (unistream) layout: every speech token and the closing EOS; text
positions never count.

Usage::

    logp = sequence_log_probs(lm, text, text_len, speech, speech_len)          # (B,), differentiable
    loss, stats = dpo_loss(logp_w, logp_l, ref_w, ref_l, beta=0.1)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .lm import IGNORE_ID, TextSpeechLM


def sequence_log_probs(lm: TextSpeechLM, text_token: torch.Tensor, text_token_len: torch.Tensor,
                       speech_token: torch.Tensor, speech_token_len: torch.Tensor) -> torch.Tensor:
    """log π(μ | y) per utterance (B,): the LM's log-probabilities of the speech tokens and EOS,
    teacher-forced in the unistream layout [sos, y, task_id, μ], summed over each sequence."""
    out = lm(text_token, text_token_len, speech_token, speech_token_len, bistream=False)
    target = out["target"]
    keep = target != IGNORE_ID
    logp = out["logits"].float().log_softmax(-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * keep).sum(dim=1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 13 averaged over the batch, from sequence log-probs (B,) of the policy and the frozen
    reference; also the mean implicit reward margin and the share of pairs ranked correctly."""
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    shapes = {t.shape for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1:
        raise ValueError(f"all four log-prob tensors need the same shape, got {sorted(map(tuple, shapes))}")
    margin = beta * ((policy_chosen - ref_chosen.detach()) - (policy_rejected - ref_rejected.detach()))
    loss = -F.logsigmoid(margin).mean()
    margin = margin.detach()
    return loss, {"margin": float(margin.mean()), "accuracy": float((margin > 0).float().mean())}
