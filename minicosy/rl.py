"""Fine-tuning the text-speech LM: mSFT speaker tags (§2.7), DPO (§2.8, eq. 13) and the
differentiable ASR reward (eqs. 14-15).

    L_DPO = -log σ( β·log π_θ(μ^w|y)/π_ref(μ^w|y) - β·log π_θ(μ^l|y)/π_ref(μ^l|y) )

μ^w / μ^l are the preferred / rejected speech-token sequences for the text y (ranked by WER and
speaker similarity), π_ref a frozen copy of the starting LM. Log-probabilities are summed over the
speech positions of the unified (unistream) layout: every speech token and the closing EOS; text
positions never count.

Usage::

    logp = sequence_log_probs(lm, text, text_len, speech, speech_len)          # (B,), differentiable
    loss, stats = dpo_loss(logp_w, logp_l, ref_w, ref_l, beta=0.1)
    speaker_prompt("Speaker A")                                                # 'Speaker A<|endofprompt|>'
    loss = asr_reward_loss(lm, tokenizer, text, text_len, speech, speech_len, units, unit_len)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from .instruct import END_OF_PROMPT
from .lm import IGNORE_ID, TextSpeechLM
from .lm_train import collate_lm
from .speech_tokenizer import SpeechTokenizer


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


def speaker_prompt(speaker: str | None = None) -> str:
    """The mSFT speaker tag (§2.7) that goes before the text: ``"Speaker A<|endofprompt|>"`` for a
    labelled speaker, ``"unknown<|endofprompt|>"`` otherwise."""
    if speaker is not None and (not isinstance(speaker, str) or not speaker.strip() or "<|" in speaker):
        raise ValueError(f"a speaker label must be a non-empty string without special tokens, got {speaker!r}")
    return f"{speaker.strip() if speaker else 'unknown'}{END_OF_PROMPT}"


def gumbel_softmax(logits: torch.Tensor, tau: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """A relaxed one-hot sample softmax((logits + g) / τ), g ~ Gumbel(0, 1) (seedable)."""
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    u = torch.rand(logits.shape, generator=generator, device=logits.device).clamp(1e-10, 1 - 1e-10)
    return ((logits.float() - torch.log(-torch.log(u))) / tau).softmax(-1)


def asr_reward_loss(lm: TextSpeechLM, tokenizer: SpeechTokenizer, text_token: torch.Tensor, text_token_len: torch.Tensor,
                    speech_token: torch.Tensor, speech_token_len: torch.Tensor, units: torch.Tensor,
                    unit_len: torch.Tensor, tau: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """The differentiable ASR reward of §2.8 (eqs. 14-15), L_ASR = -log P(Y | Ĥ; θ_ASR).

    At every speech position of the unistream layout the LM's next-token distribution over the
    speech codes is sampled with the Gumbel-softmax; the relaxed one-hot is read back into FSQ digits
    (eq. 14, the expected digit vector) and through the tokenizer's Proj_up to Ĥ, and the tokenizer's
    Encoder2 + CTC head score the transcript units ``units`` (ids into ``tokenizer.vocab``, 1-based;
    0 is the blank). Gradients reach the LM only: this call sets the tokenizer's ``requires_grad``
    to False."""
    if tokenizer.quantizer_kind != "fsq" or tokenizer.codebook_size != lm.cfg.speech_token_size:
        raise ValueError(f"the ASR reward needs an FSQ tokenizer with {lm.cfg.speech_token_size} codes, got "
                         f"{tokenizer.quantizer_kind} with {tokenizer.codebook_size}")
    tokenizer.requires_grad_(False)
    out = lm(text_token, text_token_len, speech_token, speech_token_len, bistream=False)
    speech_rows = (out["target"] >= 0) & (out["target"] < lm.cfg.speech_token_size)
    logits = pad_sequence([out["logits"][b][speech_rows[b], :lm.cfg.speech_token_size] for b in range(len(speech_rows))],
                          batch_first=True)
    lengths = speech_rows.sum(-1)
    pad = torch.arange(logits.shape[1], device=logits.device)[None, :] >= lengths[:, None]
    post = tokenizer.quantizer.decode_soft(gumbel_softmax(logits, tau, generator))
    log_probs = tokenizer.asr_log_probs(post, pad)
    return F.ctc_loss(log_probs.transpose(0, 1), units, lengths, unit_len, blank=0, zero_infinity=True)


# ----- data for fine-tuning ---------------------------------------------------------------------
def tag_examples(examples: list[dict], text_tokenizer, labels: dict[str, str]) -> list[dict]:
    """mSFT training data (§2.7): each LM example's text ids prefixed with its speaker's tag,
    ``labels[speaker]`` (e.g. ``"Speaker A"``) for a labelled speaker and ``unknown`` otherwise."""
    tags = {}
    out = []
    for ex in examples:
        label = labels.get(ex["speaker"])
        if label not in tags:
            tags[label] = torch.tensor(text_tokenizer.encode(speaker_prompt(label), normalize=False), dtype=torch.long)
        out.append({**ex, "text": torch.cat([tags[label], ex["text"]]), "tag": label or "unknown"})
    return out


def preference_pairs(candidates: dict[str, list[dict]], min_gap: float = 1e-6) -> list[dict]:
    """DPO pairs (§2.8): per text, the best and the worst of its sampled candidates, ranked by WER
    (lower is better) and then speaker similarity (higher is better). Each candidate is a dict
    with ``speech`` (token ids), ``wer`` and ``sim``; texts whose best and worst tie are skipped.
    Returns dicts with ``key``, ``chosen``, ``rejected`` and the two scores."""
    pairs = []
    for key, cands in candidates.items():
        if len(cands) < 2:
            continue
        ranked = sorted(cands, key=lambda c: (c["wer"], -c["sim"]))
        best, worst = ranked[0], ranked[-1]
        if worst["wer"] - best["wer"] < min_gap and best["sim"] - worst["sim"] < min_gap:
            continue
        pairs.append({"key": key, "chosen": best["speech"], "rejected": worst["speech"],
                      "chosen_score": (best["wer"], best["sim"]), "rejected_score": (worst["wer"], worst["sim"])})
    return pairs


def dpo_batch(pairs: list[dict], text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Chosen and rejected sequences of ``pairs`` stacked into one padded LM batch (chosen first);
    ``text`` maps each pair's key to its text ids."""
    return collate_lm([{"text": text[p["key"]], "speech": torch.as_tensor(p[side]).long()}
                       for side in ("chosen", "rejected") for p in pairs])


def dpo_step_loss(policy: TextSpeechLM, reference: TextSpeechLM, batch: dict[str, torch.Tensor],
                  beta: float = 0.1) -> torch.Tensor:
    """Eq. 13 on one :func:`dpo_batch`: the policy's and the frozen reference's sequence log-probs."""
    n = len(batch["text_token"]) // 2
    logp = sequence_log_probs(policy, **batch)
    with torch.no_grad():
        ref = sequence_log_probs(reference, **batch)
    return dpo_loss(logp[:n], logp[n:], ref[:n], ref[n:], beta)[0]
