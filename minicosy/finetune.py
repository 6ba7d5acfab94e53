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

import json
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.nn.functional import normalize

from .eval import SpeakerEncoder, SphinxASR, error_rate
from .lm import TextSpeechLM
from .lm_train import lm_batches
from .rl import asr_reward_loss, dpo_batch, dpo_step_loss, preference_pairs
from .speech_tokenizer import SpeechTokenizer, unit_ids
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
    out = []
    for ex in examples:
        r = records[ex["id"]]
        units = unit_ids(r.get("plain_text", r["text"]), r["lang"], tokenizer.vocab)
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
        out.append({"speech": tokens, "wav": tts.vocode(mel, seed)})
    return out


def score_candidates(candidates: list[dict], text: str, prompt_wav: np.ndarray, prompt_sr: int,
                     asr: SphinxASR, judge: SpeakerEncoder, sr: int = 24000) -> list[dict]:
    """Each candidate with ``wer`` (pocketsphinx against ``text``) and ``sim`` (resemblyzer cosine
    to the prompt): the ranking that :func:`~minicosy.rl.preference_pairs` reads (§2.8)."""
    return [{**c, "wer": error_rate([text], [asr.transcribe(c["wav"], sr)], "en"),
             "sim": judge.similarity(c["wav"], sr, prompt_wav, prompt_sr)} for c in candidates]


def train_dpo(policy: TextSpeechLM, pairs: list[dict], text_ids: dict[str, torch.Tensor], tcfg: TrainConfig,
              beta: float = 0.1, pairs_per_batch: int = 4, val_pairs: list[dict] | None = None) -> TrainLog:
    """DPO (eq. 13) of ``policy`` against a frozen copy of itself as it is now, on preference
    ``pairs`` (:func:`~minicosy.rl.preference_pairs`), ``pairs_per_batch`` pairs per step. With
    ``val_pairs`` (other texts' pairs) and ``tcfg.validate_minutes``, their DPO loss is checked and
    the policy ends with the weights that scored best (early stopping against overfitting)."""
    if not pairs:
        raise ValueError("no preference pairs: every text's candidates tied")
    reference = _copy(policy)
    reference.requires_grad_(False).eval()
    rng = random.Random(tcfg.seed)

    def batches():
        while True:
            order = list(pairs)
            rng.shuffle(order)
            for k in range(0, len(order), pairs_per_batch):
                yield dpo_batch(order[k:k + pairs_per_batch], text_ids)

    held = [dpo_batch(val_pairs[k:k + pairs_per_batch], text_ids) for k in range(0, len(val_pairs or []), pairs_per_batch)]

    @torch.no_grad()
    def held_out_loss() -> float:
        policy.eval()
        return float(np.mean([dpo_step_loss(policy, reference, b, beta).item() for b in held]))

    return train_loop(policy, batches(), lambda b: dpo_step_loss(policy, reference, b, beta), tcfg, desc="DPO",
                      validate=held_out_loss if held else None)


# ----- the experiments of notebook 08 (``python -m minicosy.train finetune``) ----------------------
def _finetune_config(lr: float, minutes: float, seed: int) -> TrainConfig:
    """The experiments' optimiser settings: a small learning rate, a short warm-up, a time budget."""
    return TrainConfig(lr=lr, max_minutes=minutes, warmup_steps=10, seed=seed, threads=torch.get_num_threads())


def _copy(lm: TextSpeechLM) -> TextSpeechLM:
    twin = TextSpeechLM(lm.cfg, lm.text_vocab_size)
    twin.load_state_dict(lm.state_dict())
    return twin


def score_records(tts, records: list[dict], corpus_root: str | Path, k: int = 4, seed: int = 0) -> dict[str, list[dict]]:
    """For each record, ``k`` candidates of its text in the voice of its own recording, each with
    its ``speech`` ids and the judges' ``wer`` (pocketsphinx) and ``sim`` (resemblyzer); keyed by id."""
    from tqdm.auto import tqdm

    from .audio import load_wav

    asr, judge = SphinxASR(), SpeakerEncoder()
    scored: dict[str, list[dict]] = {}
    for r in tqdm(records, desc="DPO candidates"):
        wav, sr = load_wav(Path(corpus_root) / r["path"])
        scored[r["id"]] = [{key: c[key] for key in ("speech", "wer", "sim")} for c in score_candidates(
            sample_candidates(tts, r["text"], (wav, sr), k, seed), r["text"], wav, sr, asr, judge)]
    return scored


def pair_statistics(scored: dict[str, list[dict]], pairs: list[dict]) -> dict:
    """How many texts, candidates and pairs, the judge's mean WER on the candidates and the mean
    WER gap between a pair's rejected and chosen sides."""
    wers = [c["wer"] for cands in scored.values() for c in cands]
    gap = [p["rejected_score"][0] - p["chosen_score"][0] for p in pairs]
    return {"texts": len(scored), "candidates": len(wers), "pairs": len(pairs),
            "mean_wer": float(np.mean(wers)), "mean_wer_gap": float(np.mean(gap)) if gap else 0.0}


def preference_data(tts, records: list[dict], corpus_root: str | Path, k: int = 4, seed: int = 0) -> tuple[list[dict], dict]:
    """DPO pairs from the current LM (:func:`score_records`, then the best and the worst candidate
    of each text); returns the pairs and :func:`pair_statistics`."""
    scored = score_records(tts, records, corpus_root, k, seed)
    pairs = preference_pairs(scored)
    return pairs, pair_statistics(scored, pairs)


def rl_experiment(tts, corpus_root: str | Path, tokenizer_path: str | Path, minutes: float = 3.0, texts: int = 24,
                  k: int = 4, n_eval: int = 16, asr_weight: float = 0.1, beta: float = 0.1, lr: float = 1e-4,
                  seed: int = 0) -> dict:
    """Table 11 in spirit: the tiny LM as shipped, after L_ASR, after L_DPO and after both (DPO,
    then L_ASR), each judged zero-shot on held-out sentences and voices (WER, speaker similarity)."""
    from .data import load_manifest
    from .eval import evaluate_tts
    from .lm_train import corpus_examples

    root, base = Path(corpus_root), tts.lm
    manifest = load_manifest(root, "train")
    en = [r for r in manifest if r["lang"] == "en" and 2.0 <= r["duration"] <= 6.0]
    picked = [en[i] for i in np.random.default_rng(seed).choice(len(en), min(texts, len(en)), replace=False)]
    pairs, pair_stats = preference_data(tts, picked, root, k, seed)
    text_ids = {r["id"]: torch.tensor(tts.frontend.text_ids(r["text"]), dtype=torch.long) for r in picked}
    examples = with_units(corpus_examples(root, ["train"], tts.frontend.text_tokenizer, tokenizer_path),
                          {r["id"]: r for r in manifest}, tts.frontend.speech_tokenizer)
    tcfg = _finetune_config(lr, minutes, seed)
    variants, logs = {"shipped": base}, {}
    variants["L_ASR"] = _copy(base)
    logs["L_ASR"] = finetune_lm(variants["L_ASR"], examples, tcfg, asr=(tts.frontend.speech_tokenizer, asr_weight))
    variants["L_DPO"] = _copy(base)
    logs["L_DPO"] = train_dpo(variants["L_DPO"], pairs, text_ids, tcfg, beta)
    variants["L_DPO + L_ASR"] = _copy(variants["L_DPO"])
    logs["L_DPO + L_ASR"] = finetune_lm(variants["L_DPO + L_ASR"], examples, tcfg,
                                        asr=(tts.frontend.speech_tokenizer, asr_weight))
    table = {}
    try:
        for name, lm in variants.items():
            tts.lm = lm.eval()
            table[name] = evaluate_tts(tts, root, n=n_eval, modes=("offline",), seed=seed, progress=False)["offline"]
    finally:
        tts.lm = base
    return {"table": table, "pairs": pair_stats, "variants": variants,
            "curves": {name: {"steps": log.steps, "losses": log.losses} for name, log in logs.items()}}


@torch.inference_mode()
def tag_similarity(tts, lm: TextSpeechLM, labels: dict[str, str], texts: list[str], seed: int = 0) -> np.ndarray:
    """CAM++ similarity (rows: the tag used, columns: each voice's mean embedding) of SFT outputs
    whose flow gets one shared x-vector (the mean of the labelled voices'): what the tag alone
    changes through the LM's tokens."""
    from .rl import speaker_prompt

    voices = sorted(labels)
    table = torch.cat([normalize(tts.spk2info[v]["embedding"].reshape(1, -1).float()) for v in voices])
    shared = normalize(table.mean(0, keepdim=True))
    empty_token, empty_feat = torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, tts.config.flow.n_mels)
    sims = np.zeros((len(voices), len(voices)))
    for i, v in enumerate(voices):
        tag = tts.frontend.text_tokenizer.encode(speaker_prompt(labels[v]), normalize=False)
        for text in texts:
            tokens = list(lm.inference(tts.frontend.text_ids(text), prompt_text=tag,
                                       generator=torch.Generator().manual_seed(seed)))
            wav = tts.vocode(tts.flow.inference(torch.tensor([tokens]), empty_token, empty_feat, shared), seed)
            emb = normalize(torch.as_tensor(tts.frontend.speaker_model.embed(wav, 24000)).reshape(1, -1).float())
            sims[i] += (emb @ table.T)[0].numpy() / len(texts)
    return sims


def msft_experiment(tts, corpus_root: str | Path, tokenizer_path: str | Path, minutes: float = 3.0, lr: float = 1e-4,
                    sentences: int = 4, seed: int = 0) -> dict:
    """§2.7 at small scale: fine-tune the LM with ``Speaker X<|endofprompt|>`` tags on the English
    training voices (``unknown`` for the rest), then compare :func:`tag_similarity` of the tuned
    LM with that of the shipped LM given the same tags (which never saw them)."""
    from .data import load_manifest
    from .lm_train import corpus_examples
    from .rl import tag_examples

    root = Path(corpus_root)
    voices = sorted({r["speaker"] for r in load_manifest(root, "train") if r["lang"] == "en"} & tts.spk2info.keys())
    labels = msft_labels(voices)
    train = corpus_examples(root, ["train"], tts.frontend.text_tokenizer, tokenizer_path)
    lm = _copy(tts.lm)
    log = finetune_lm(lm, tag_examples(train, tts.frontend.text_tokenizer, labels),
                      _finetune_config(lr, minutes, seed))
    texts = [r["text"] for r in load_manifest(root, "test") if r["lang"] == "en"][:sentences]
    result = {"labels": labels, "lm": lm, "curve": {"steps": log.steps, "losses": log.losses}}
    for name, model in (("shipped", tts.lm), ("mSFT", lm)):
        sims = tag_similarity(tts, model.eval(), labels, texts, seed)
        off = sims[~np.eye(len(sims), dtype=bool)]
        result[name] = {"similarity": sims.tolist(), "own": float(np.diag(sims).mean()), "other": float(off.mean())}
    return result


def finetune_main(argv: list[str] | None = None) -> None:
    """``python -m minicosy.train finetune [--minutes 3] [--out data/checkpoints/finetune_results.json]``:
    the mSFT and RL experiments on the tiny model; prints and saves their numbers."""
    from .pipeline import CosyVoice2
    from .train import is_main_process, provenance, recipe_parser

    p = recipe_parser("finetune", 3.0, "data/checkpoints/finetune_results.json", resumable=False)
    p.add_argument("--model", default="data/checkpoints")
    p.add_argument("--speech-tokenizer", default="data/checkpoints/speech_tokenizer_fsq.pt")
    p.add_argument("--texts", type=int, default=24, help="training sentences that give DPO pairs")
    p.add_argument("--k", type=int, default=4, help="candidates sampled per sentence")
    p.add_argument("--n-eval", type=int, default=16)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    tts = CosyVoice2.from_pretrained(a.model)
    msft = msft_experiment(tts, a.corpus, a.speech_tokenizer, a.minutes, seed=a.seed)
    for name in ("shipped", "mSFT"):
        print(f"{name:8s} CAM++ similarity to the tagged voice {msft[name]['own']:.3f}, to the others {msft[name]['other']:.3f}")
    rl = rl_experiment(tts, a.corpus, a.speech_tokenizer, a.minutes, a.texts, a.k, a.n_eval, seed=a.seed)
    print(f"DPO pairs: {rl['pairs']}")
    for name, row in rl["table"].items():
        print(f"{name:14s} WER {row['WER']:.3f}  SIM {row['SIM (resemblyzer)']:.3f}  SIM CAM++ {row['SIM (CAM++)']:.3f}")
    out = {"msft": {k: v for k, v in msft.items() if k != "lm"}, "rl": {k: v for k, v in rl.items() if k != "variants"},
           "made_by": {**provenance(), "minutes": a.minutes, "texts": a.texts,
                       "k": a.k, "n_eval": a.n_eval, "seed": a.seed}}
    if is_main_process():
        Path(a.out).write_text(json.dumps(out, indent=1))
        print(f"-> {a.out}")


def readable_records(corpus_root: str | Path, n: int, seed: int = 0, per_voice_check: int = 20,
                     lang: str = "en") -> list[dict]:
    """``n`` training utterances (2-6 s), a seeded draw, of the training voices whose recordings
    pocketsphinx reads at WER <= :data:`~minicosy.eval.READABLE_WER` (checked on each voice's first
    ``per_voice_check`` training utterances): texts on which the DPO judge can read the model."""
    from .data import load_manifest
    from .eval import recording_wer_by_voice

    readable = {voice for voice, row in recording_wer_by_voice(corpus_root, ("train",), lang, per_voice_check).items()
                if row["readable"]}
    pool = [r for r in load_manifest(corpus_root, "train")
            if r["lang"] == lang and r["speaker"] in readable and 2.0 <= r["duration"] <= 6.0]
    if len(pool) < n:
        raise ValueError(f"{corpus_root} has {len(pool)} training utterances of readable voices "
                         f"({sorted(readable)}), fewer than the {n} asked for")
    return [pool[i] for i in np.random.default_rng(seed).choice(len(pool), n, replace=False)]


def cached_scores(tts, records: list[dict], corpus_root: str | Path, k: int, seed: int,
                  cache: Path | None) -> dict[str, list[dict]]:
    """:func:`score_records`, kept in ``cache`` (if given): candidates take most of a DPO run's
    time, so later runs on the same texts, ``k`` and seed read them back."""
    ids = [r["id"] for r in records]
    if cache is not None and cache.exists():
        saved = torch.load(cache, weights_only=True)
        if saved["ids"] != ids or saved["k"] != k or saved["seed"] != seed:
            raise ValueError(f"{cache} holds candidates of other texts, k or seed; remove it or give another file")
        return saved["scored"]
    scored = score_records(tts, records, corpus_root, k, seed)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"ids": ids, "k": k, "seed": seed, "scored": scored}, cache)
    return scored


def dpo_main(argv: list[str] | None = None) -> None:
    """``python -m minicosy.train dpo --model tiny-phone --corpus data/corpus_large --out runs/dpo/lm.pt``:
    DPO (§2.8, eq. 13) of a model folder's LM on its own samples. Each of ``--texts`` training
    sentences of readable voices gets ``--k`` candidates, ranked by pocketsphinx WER, then
    resemblyzer similarity; the best and the worst make a pair. ``--val-texts`` other sentences give
    held-out pairs whose DPO loss picks the weights kept. Writes the LM, its card and, beside them,
    a model folder (``minicosy.json``: the base model with this LM) for ``python -m minicosy eval``."""
    from .pipeline import CosyVoice2, derive_model_folder
    from .train import recipe_parser, save_checkpoint

    p = recipe_parser("dpo", 10.0, "runs/dpo/lm.pt", resumable=False)
    p.add_argument("--model", default="tiny-phone", help="model folder or name whose LM is tuned and whose chain samples")
    p.add_argument("--texts", type=int, default=200, help="training sentences whose candidates give the training pairs")
    p.add_argument("--val-texts", type=int, default=40, help="more sentences: held-out pairs for early stopping")
    p.add_argument("--k", type=int, default=4, help="candidates sampled per sentence")
    p.add_argument("--beta", type=float, default=0.1, help="eq. 13's beta")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--validate-minutes", type=float, default=1.0)
    p.add_argument("--candidates", help="file (.pt) for the scored candidates: written once, read by later runs")
    p.add_argument("--check-recordings", type=int, default=20,
                   help="recordings per training voice that pocketsphinx reads to find the readable voices")
    a = p.parse_args(argv)
    if a.texts < 1 or a.val_texts < 1 or a.k < 2:
        raise ValueError("--texts and --val-texts must be at least 1 and --k at least 2")
    torch.set_num_threads(a.threads)
    tts = CosyVoice2.from_pretrained(a.model)
    records = readable_records(a.corpus, a.texts + a.val_texts, a.seed, a.check_recordings)
    scored = cached_scores(tts, records, a.corpus, a.k, a.seed, Path(a.candidates) if a.candidates else None)
    parts = {"train": records[:a.texts], "val": records[a.texts:]}
    pairs = {name: preference_pairs({r["id"]: scored[r["id"]] for r in rs}) for name, rs in parts.items()}
    stats = {name: pair_statistics({r["id"]: scored[r["id"]] for r in rs}, pairs[name]) for name, rs in parts.items()}
    print("pairs:", json.dumps(stats))
    if not pairs["train"] or not pairs["val"]:
        raise ValueError("every candidate of the training or the held-out texts tied: no pairs to learn or to check")
    text_ids = {r["id"]: torch.tensor(tts.frontend.text_ids(r["text"]), dtype=torch.long) for r in records}
    tcfg = TrainConfig(lr=a.lr, max_minutes=a.minutes, warmup_steps=10, seed=a.seed, threads=a.threads,
                       validate_minutes=a.validate_minutes, log_every=5)
    log = train_dpo(tts.lm, pairs["train"], text_ids, tcfg, a.beta, val_pairs=pairs["val"])
    print(f"held-out pairs' DPO loss: ln 2 = 0.6931 at the start (policy = reference), "
          f"best {log.extra['best_validation']:.4f} at step {log.extra['best_step']}")
    save_checkpoint(a.out, tts.lm, tts.lm.model_config(), tcfg, log, pairs=stats, beta=a.beta, k=a.k,
                    init=str(a.model))
    folder = derive_model_folder(tts.model_dir, Path(a.out).parent, llm=a.out)
    print(f"-> {a.out}; model folder {folder} (python -m minicosy eval --model {folder})")
