"""Training the text-speech LM (§2.3): corpus utterances as (text ids, speech tokens) pairs, zero-shot
continuations (:func:`prompt_pairs`), length-bucketed batches, held-out accuracy and perplexity,
and the recipe ``python -m minicosy.train lm``.

Usage::

    train = corpus_examples("data/corpus", ["train"], text_tokenizer, "data/checkpoints/speech_tokenizer_fsq.pt")
    lm, metrics = train_lm(train, held, get_config("tiny").lm, len(text_tokenizer), TrainConfig(max_minutes=5))
"""
from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from .config import LMConfig, get_config, lm_for_units
from .data import INSTRUCT_DIR, load_manifest
from .lm import TextSpeechLM
from .text_tokenizer import TextTokenizer, UnitTokenizer, load_text_tokenizer
from .train import (TrainConfig, load_checkpoint, load_state_dict_checked, recipe_parser, save_checkpoint,
                    seed_everything, state_file, train_loop)


def lm_examples(records: list[dict], text_tokenizer: TextTokenizer | UnitTokenizer,
                speech_tokens: Mapping[str, torch.Tensor]) -> list[dict]:
    """Training pairs of corpus utterances: normalised text ids and their 25 Hz speech tokens.
    A record's ``instruction`` (instruct sub-corpus, ending in ``<|endofprompt|>``) goes before its
    text, unnormalised, as :meth:`~minicosy.pipeline.CosyVoice2.inference_instruct2` feeds it (§2.6).
    Utterances without text ids or speech tokens are left out."""
    out = []
    for r in records:
        prefix = text_tokenizer.encode(r["instruction"], normalize=False) if r.get("instruction") else []
        text = torch.tensor(prefix + text_tokenizer.encode(r["text"], normalize=True), dtype=torch.long)
        speech = speech_tokens.get(r["id"])
        if len(text) and speech is not None and len(speech):
            out.append({"id": r["id"], "speaker": r["speaker"], "lang": r["lang"], "text": text, "speech": speech.long(),
                        "instruct": bool(r.get("condition"))})
    return out


def corpus_examples(corpus_root: str | Path, splits: Iterable[str], text_tokenizer: TextTokenizer | UnitTokenizer,
                    speech_tokenizer: str | Path, augmented_copy: int = 0) -> list[dict]:
    """:func:`lm_examples` of the corpus splits, with the tokens of the given speech tokenizer (§2.2)
    (of an augmented copy of the train split if ``augmented_copy`` > 0, see ``corpus_tokens``)."""
    from .speech_tokenizer import corpus_tokens

    tokens = corpus_tokens(corpus_root, speech_tokenizer, augmented_copy)
    return lm_examples([r for s in splits for r in load_manifest(corpus_root, s)], text_tokenizer, tokens)


def prompt_pairs(examples: list[dict], share: float, rng: random.Random) -> list[dict]:
    """Zero-shot continuations to train on: for ``share`` of ``examples`` (at random; instruct ones
    excepted), a copy with another utterance of its speaker and language in front, text before text
    and speech before speech, as :meth:`TextSpeechLM.inference` lays out prompt and target (§2.3,
    ICL). An LM trained on single utterances only has never continued speech past the end of the
    text it covers; at small scale that costs zero-shot synthesis its first words."""
    if not 0 <= share <= 1:
        raise ValueError(f"the share of prompt pairs must be in [0, 1], got {share}")
    if share == 0:
        return []
    by_voice: dict[tuple[str, str], list[dict]] = {}
    for ex in examples:
        if not ex.get("instruct"):
            by_voice.setdefault((ex["speaker"], ex["lang"]), []).append(ex)
    out = []
    for ex in examples:
        others = by_voice.get((ex["speaker"], ex["lang"]), [])
        if ex.get("instruct") or len(others) < 2 or rng.random() >= share:
            continue
        prompt = ex
        while prompt is ex:
            prompt = rng.choice(others)
        out.append({**ex, "id": f"{prompt['id']}+{ex['id']}", "text": torch.cat([prompt["text"], ex["text"]]),
                    "speech": torch.cat([prompt["speech"], ex["speech"]])})
    return out


def collate_lm(items: list[dict]) -> dict[str, torch.Tensor]:
    """Zero-padded ``text_token``/``speech_token`` with their lengths (the forward's arguments), and
    ``units``/``unit_len`` when every item has ``units``."""
    def pad(key: str) -> tuple[torch.Tensor, torch.Tensor]:
        seqs = [it[key] for it in items]
        return pad_sequence(seqs, batch_first=True), torch.tensor([len(s) for s in seqs], dtype=torch.int32)

    (text, text_len), (speech, speech_len) = pad("text"), pad("speech")
    batch = {"text_token": text, "text_token_len": text_len, "speech_token": speech, "speech_token_len": speech_len}
    if all("units" in it for it in items):          # transcript units for the ASR reward (minicosy.rl)
        batch["units"], batch["unit_len"] = pad("units")
    return batch


def lm_batches(examples: list[dict], max_rows: int, rng: random.Random) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches of similar-length utterances with at most ``max_rows`` padded rows each,
    in a fresh random order every epoch."""
    batches, current = [], []
    for ex in sorted(examples, key=lambda e: len(e["text"]) + len(e["speech"])):
        rows = len(ex["text"]) + len(ex["speech"]) + 3
        if current and rows * (len(current) + 1) > max_rows:
            batches.append(current)
            current = []
        current.append(ex)
    batches.append(current)
    while True:
        rng.shuffle(batches)
        yield from (collate_lm(b) for b in batches)


@torch.no_grad()
def evaluate_lm(lm: TextSpeechLM, examples: list[dict], bistream: bool = False, batch_size: int = 16) -> dict:
    """Next-token accuracy and perplexity over the speech-token targets (codes < 6561; EOS and
    fill excluded) of ``examples`` in one layout (``bistream`` where the length rule allows it)."""
    lm.eval()
    nll, correct, count = 0.0, 0, 0
    for k in range(0, len(examples), batch_size):
        out = lm(**collate_lm(examples[k:k + batch_size]), bistream=bistream)
        keep = (out["target"] >= 0) & (out["target"] < lm.cfg.speech_token_size)
        logits, target = out["logits"][keep].float(), out["target"][keep]
        nll += F.cross_entropy(logits, target, reduction="sum").item()
        correct += int((logits.argmax(-1) == target).sum())
        count += int(keep.sum())
    return {"accuracy": correct / max(count, 1), "perplexity": math.exp(nll / max(count, 1)), "tokens": count}


def unigram_perplexity(train: list[dict], held: list[dict], vocab: int = 6561) -> float:
    """Perplexity of held-out speech tokens under add-one smoothed training-set code frequencies:
    the baseline an LM that ignores text and context would reach."""
    counts = torch.bincount(torch.cat([e["speech"] for e in train]), minlength=vocab).double() + 1
    logp = (counts / counts.sum()).log()
    return math.exp(-float(logp[torch.cat([e["speech"] for e in held])].mean()))


def train_lm(train: list[dict], held: list[dict], cfg: LMConfig, text_vocab_size: int, tcfg: TrainConfig,
             max_rows: int = 3000, out: str | Path | None = None, init: str | Path | None = None
             ) -> tuple[TextSpeechLM, dict]:
    """Train a text-speech LM on both layouts (§2.3; the official coin flip per utterance), from
    scratch or from the weights of the LM checkpoint ``init`` (same sizes; ``cfg`` may change what
    is not a weight, e.g. the mix ratio, and add or drop the alignment aid), evaluate on ``held``
    and save a checkpoint with its card to ``out``. With ``tcfg.validate_minutes`` the held-out
    perplexity picks the weights kept (early stopping)."""
    seed_everything(tcfg.seed)
    lm = TextSpeechLM(cfg, text_vocab_size)
    if init is not None:           # the alignment head (lm_align) starts afresh or is left out as needed
        own = {k: v for k, v in lm.state_dict().items() if k.startswith("align_head.")}
        state = {k: v for k, v in load_checkpoint(init)["state_dict"].items() if not k.startswith("align_head.") or own}
        load_state_dict_checked(lm, {**own, **state}, f"LM checkpoint {init} (--init)")
    coin, order = random.Random(tcfg.seed), random.Random(tcfg.seed + 1)
    log = train_loop(lm, lm_batches(train, max_rows, order), lambda b: lm(**b, rng=coin)["loss"], tcfg,
                     desc="text-speech LM", validate=lambda: evaluate_lm(lm, held)["perplexity"])
    metrics = {layout: evaluate_lm(lm, held, bistream=layout == "bistream") for layout in ("unistream", "bistream")}
    metrics["unigram_perplexity"] = unigram_perplexity(train, held, cfg.speech_token_size)
    metrics["train_utterances"], metrics["train_speech_tokens"] = len(train), sum(len(e["speech"]) for e in train)
    metrics["instruct_utterances"] = sum(1 for e in train if e.get("instruct"))
    metrics.update({k: log.extra[k] for k in ("best_step", "best_validation") if k in log.extra})
    for layout in ("unistream", "bistream"):
        m = metrics[layout]
        print(f"held-out ({layout}): next-token accuracy {m['accuracy']:.3f}, perplexity {m['perplexity']:.1f} "
              f"over {m['tokens']} speech tokens")
    print(f"unigram baseline perplexity {metrics['unigram_perplexity']:.1f}; trained {log.seconds / 60:.1f} min")
    if out is not None:
        save_checkpoint(out, lm, lm.model_config(), tcfg, log, metrics=metrics,
                        **({} if init is None else {"init": str(init)}))
    return lm, metrics


def train_main(argv: list[str] | None = None) -> None:
    """``python -m minicosy.train lm [--minutes 12] [--out data/checkpoints/lm_tiny.pt]``: the tiny
    LM on the corpus' train split and the instruct sub-corpus (§2.6); held-out accuracy/perplexity
    on dev + test, which also picks the weights kept (checked every ``--validate-minutes``)."""
    p = recipe_parser("lm", 12.0, "data/checkpoints/lm_tiny.pt", device=True)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--speech-tokenizer", default="data/checkpoints/speech_tokenizer_fsq.pt")
    p.add_argument("--text-tokenizer", default=None, help="a text tokenizer folder (default: the preset's text units, "
                   "data/checkpoints/text_tokenizer for BPE or text_units for phones)")
    p.add_argument("--max-rows", type=int, default=3000, help="padded sequence rows per batch")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--validate-minutes", type=float, default=1.0, help="0: keep the last weights")
    p.add_argument("--no-instruct", action="store_true", help="leave out the instruct sub-corpus")
    p.add_argument("--instruct-repeat", type=int, default=2, help="times each instruct example is seen per epoch")
    p.add_argument("--augmented-copies", type=int, default=0,
                   help="add this many copies of the train split tokenised from tempo/VTLP-augmented audio")
    p.add_argument("--prompt-pairs", type=float, default=0.0, help="add this share of the train split again "
                   "with another utterance of the same voice in front (zero-shot continuations, lm.prompt_pairs)")
    p.add_argument("--init", help="start from this LM checkpoint's weights (same sizes) instead of at random")
    p.add_argument("--snapshots", help="keep the weights at every validation in this folder (for a learning curve: "
                                       "scripts/learning_curve.py)")
    p.add_argument("--align-ctc", type=float, default=0.0, help="weight of the training-only alignment aid "
                   "(minicosy.lm_align: CTC reading the text back from the speech rows); 0: the paper's loss")
    a = p.parse_args(argv)
    if a.align_ctc > 0 and not a.no_instruct:
        raise ValueError("--align-ctc needs --no-instruct: an instruction is text the speech does not say")
    threads = a.threads
    torch.set_num_threads(threads)
    units = get_config(a.preset).text.units
    tok = load_text_tokenizer(a.text_tokenizer or ("data/checkpoints/text_units" if units == "phone"
                                                   else "data/checkpoints/text_tokenizer"))
    train = [ex for k in range(a.augmented_copies + 1)
             for ex in corpus_examples(a.corpus, ["train"], tok, a.speech_tokenizer, augmented_copy=k)]
    train += prompt_pairs(train, a.prompt_pairs, random.Random(a.seed))
    instruct = Path(a.corpus) / INSTRUCT_DIR
    if not a.no_instruct:
        if not (instruct / "manifest.jsonl").exists():
            raise FileNotFoundError(f"{instruct}/manifest.jsonl not found: run `python -m minicosy.data build` "
                                    "(or pass --no-instruct)")
        train += corpus_examples(instruct, ["train"], tok, a.speech_tokenizer) * a.instruct_repeat
    held = corpus_examples(a.corpus, ["dev", "test"], tok, a.speech_tokenizer)
    tcfg = TrainConfig(lr=a.lr, max_minutes=a.minutes, seed=a.seed, warmup_steps=50, threads=threads,
                       validate_minutes=a.validate_minutes, device=a.device, state_path=state_file(a.state, a.out),
                       snapshot_dir=a.snapshots)
    from .speech_tokenizer import SpeechTokenizer   # the speech vocabulary is the tokenizer's codebook

    codes = SpeechTokenizer.from_checkpoint(a.speech_tokenizer).codebook_size
    kind = "phone" if isinstance(tok, UnitTokenizer) else "bpe"
    cfg = dataclasses.replace(lm_for_units(get_config(a.preset).lm, kind), speech_token_size=codes,
                              align_ctc_weight=a.align_ctc)
    train_lm(train, held, cfg, len(tok), tcfg, a.max_rows, a.out, a.init)
