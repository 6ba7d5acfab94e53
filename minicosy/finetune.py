"""Fine-tuning the tiny text-speech LM end to end (§2.7, §2.8): mSFT on labelled voices, DPO pairs
from sampled syntheses ranked by an independent recogniser and speaker judge, and the
differentiable ASR reward. The losses live in :mod:`minicosy.rl`; this module feeds them data made
with the whole pipeline.

Usage::

    tts = CosyVoice2.from_pretrained("tiny")
    cands = sample_candidates(tts, "We walk to the park.", "prompt.wav", k=4, seed=0)
    pairs = preference_pairs({"t0": score_candidates(cands, "We walk to the park.", prompt_wav, sr, asr, judge)})
    log = finetune_lm(lm, examples, TrainConfig(lr=1e-4, max_minutes=3), asr=(tokenizer, 0.1))
"""
from __future__ import annotations

import random
from typing import Callable

import numpy as np
import torch

from .eval import SpeakerEncoder, SphinxASR, error_rate
from .lm import TextSpeechLM, lm_batches
from .rl import asr_reward_loss, dpo_batch, dpo_step_loss
from .speech_tokenizer import SpeechTokenizer, transcript
from .train import TrainConfig, TrainLog, train_loop

LM_INPUTS = ("text_token", "text_token_len", "speech_token", "speech_token_len")


def msft_labels(speakers: list[str]) -> dict[str, str]:
    """Tags for labelled voices, in sorted order: ``Speaker A``, ``Speaker B``, … (§2.7)."""
    if len(speakers) > 26:
        raise ValueError(f"at most 26 labelled speakers, got {len(speakers)}")
    return {s: f"Speaker {chr(65 + i)}" for i, s in enumerate(sorted(speakers))}


def with_units(examples: list[dict], records: dict[str, dict], tokenizer: SpeechTokenizer) -> list[dict]:
    """LM examples with the ASR reward's targets: the reading units of each utterance's transcript
    as ids of ``tokenizer.vocab`` (1-based, 0 is the CTC blank); units it does not know are dropped."""
    index = {u: i + 1 for i, u in enumerate(tokenizer.vocab)}
    out = []
    for ex in examples:
        r = records[ex["id"]]
        units = [index[u] for u in transcript(r.get("plain_text", r["text"]), r["lang"]) if u in index]
        if units:
            out.append({**ex, "units": torch.tensor(units, dtype=torch.long)})
    return out


def finetune_lm(lm: TextSpeechLM, examples: list[dict], tcfg: TrainConfig, max_rows: int = 3000,
                asr: tuple[SpeechTokenizer, float] | None = None, tau: float = 1.0,
                validate: Callable[[], float] | None = None) -> TrainLog:
    """Continue training ``lm`` on ``examples`` with its own loss (both layouts, as in pre-training),
    plus ``weight`` × the differentiable ASR reward of ``asr = (tokenizer, weight)`` (eqs. 14-15;
    the examples need ``units``, see :func:`with_units`)."""
    coin, order = random.Random(tcfg.seed), random.Random(tcfg.seed + 1)
    generator = torch.Generator().manual_seed(tcfg.seed)
    if asr is not None and not all("units" in ex for ex in examples):
        raise ValueError("the ASR reward needs transcript units on every example (finetune.with_units)")

    def loss_fn(batch: dict) -> torch.Tensor:
        loss = lm(**{k: batch[k] for k in LM_INPUTS}, rng=coin)["loss"]
        if asr is None:
            return loss
        tokenizer, weight = asr
        return loss + weight * asr_reward_loss(lm, tokenizer, *(batch[k] for k in LM_INPUTS), batch["units"],
                                               batch["unit_len"], tau, generator)

    return train_loop(lm, lm_batches(examples, max_rows, order), loss_fn, tcfg, desc="LM fine-tuning",
                      validate=validate)


@torch.inference_mode()
def sample_candidates(tts, text: str, prompt_wav, k: int = 4, seed: int = 0) -> list[dict]:
    """``k`` sampled speech-token sequences for ``text`` (the LM without a prompt, as in SFT and
    cross-lingual synthesis), each rendered by the flow and HiFT in the prompt's voice: dicts with
    ``speech`` (ids) and ``wav`` (24 kHz numpy)."""
    ids = tts.frontend.text_ids(text)
    p = tts.frontend.prompt(prompt_wav)
    out = []
    for j in range(k):
        tokens = list(tts.lm.inference(ids, generator=torch.Generator().manual_seed(seed + j)))
        if not tokens:
            continue
        mel = tts.flow.inference(torch.tensor([tokens]), p.speech_token, p.speech_feat, p.embedding)
        wav = tts.hift.inference(mel.float(), generator=torch.Generator().manual_seed(seed))[0][0].numpy()
        out.append({"speech": tokens, "wav": wav})
    return out


def score_candidates(candidates: list[dict], text: str, prompt_wav: np.ndarray, prompt_sr: int,
                     asr: SphinxASR, judge: SpeakerEncoder, sr: int = 24000) -> list[dict]:
    """Each candidate with ``wer`` (pocketsphinx against ``text``) and ``sim`` (resemblyzer cosine
    to the prompt): the ranking that :func:`~minicosy.rl.preference_pairs` reads (§2.8)."""
    return [{**c, "wer": error_rate([text], [asr.transcribe(c["wav"], sr)], "en"),
             "sim": judge.similarity(c["wav"], sr, prompt_wav, prompt_sr)} for c in candidates]


def train_dpo(policy: TextSpeechLM, pairs: list[dict], text_ids: dict[str, torch.Tensor], tcfg: TrainConfig,
              beta: float = 0.1, pairs_per_batch: int = 4) -> TrainLog:
    """DPO (eq. 13) of ``policy`` against a frozen copy of itself as it is now, on preference
    ``pairs`` (:func:`~minicosy.rl.preference_pairs`), ``pairs_per_batch`` pairs per step."""
    if not pairs:
        raise ValueError("no preference pairs: every text's candidates tied")
    reference = TextSpeechLM(policy.cfg, policy.text_vocab_size)
    reference.load_state_dict(policy.state_dict())
    reference.requires_grad_(False).eval()
    rng = random.Random(tcfg.seed)

    def batches():
        while True:
            order = list(pairs)
            rng.shuffle(order)
            for k in range(0, len(order), pairs_per_batch):
                yield dpo_batch(order[k:k + pairs_per_batch], text_ids)

    return train_loop(policy, batches(), lambda b: dpo_step_loss(policy, reference, b, beta), tcfg, desc="DPO")
