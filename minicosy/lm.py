"""The unified text-speech language model of CosyVoice 2 (paper §2.3, Fig. 2; NOTES.md §2).

A Qwen2 decoder (transformers' ``Qwen2ForCausalLM``, used on embeddings only) reads one sequence
that mixes three kinds of rows:

* text ids      -> Qwen's own ``embed_tokens``
* speech ids    -> ``speech_embedding`` (6561 FSQ codes + EOS 6561, unused 6562, fill 6563)
* sos / task_id -> the two rows of ``llm_embedding`` (ids 0 and 1)

and predicts the next speech token with ``llm_decoder`` (Linear H -> 6564) on the last hidden
state after Qwen's final RMSNorm. Qwen's ``lm_head`` exists only so the official ``llm.pt``
loads strictly; it is never evaluated. There is no speaker embedding (§2.3).

Sequences (§2.3 and the official ``prepare_lm_input_target``), N:M = 5:15 (the paper's, for BPE; reading
units use 12:15, ``config.UNIT_MIX_RATIO``):

* unistream:  sos, text, task_id, speech            targets (1+len(text)) x ignore, speech, EOS
* bistream:   sos, [5 text, 15 speech]*, rest text, task_id, rest speech
              targets per group 4 x ignore, the 15 speech ids, fill; then ignore per rest text,
              rest speech, EOS

Inference (§2.3 "ICL/SFT, (Non-)Streaming") yields speech ids one by one with the HF KV cache:
:meth:`TextSpeechLM.inference` for the non-streaming layouts and
:meth:`TextSpeechLM.inference_bistream` for text-in streaming. ``inference(..., static_cache=True)``
decodes into a KV cache allocated once for the whole request (transformers' ``StaticCache``), so
every one-token step has the same shapes and :meth:`TextSpeechLM.compile_decode_step` can compile
it once (d_lm of eq. 11, §2.5). Usage::

    lm = load_official_llm("llm.pt", qwen_dir="CosyVoice-BlankEN")
    tokens = list(lm.inference(text_ids, prompt_text_ids, prompt_speech_ids))
    lm.compile_decode_step()                    # optional; "reduce-overhead" (CUDA graphs) on CUDA
    tokens = list(lm.inference(text_ids, prompt_text_ids, prompt_speech_ids, static_cache=True))

    python -m minicosy.train lm          # the tiny LM on the corpus, ~9 min on 2 cores
    lm = TextSpeechLM.from_checkpoint("data/checkpoints/lm_tiny.pt")
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import numbers
import random
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Model, StaticCache

from .config import LMConfig
from .lm_align import AlignmentHead
from .lm_sampling import Sampler, greedy_sampling, ras_sampling
from .train import load_state_dict_checked, model_from_checkpoint, read_torch_file

IGNORE_ID = -1  # target (and input padding) value that the loss skips
Ids = torch.Tensor | list[int] | tuple[int, ...]
# transformers 5.x renamed `past_key_values` to `cache` (the old name is deprecated)
_CACHE_ARG = "cache" if "cache" in inspect.signature(Qwen2Model.forward).parameters else "past_key_values"


def qwen2_config(cfg: LMConfig, text_vocab_size: int) -> Qwen2Config:
    """The Qwen2 backbone config for ``cfg`` (Qwen2.5-0.5B layout: tied embeddings, SiLU, q/k/v bias)."""
    return Qwen2Config(
        vocab_size=text_vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings, hidden_act="silu", tie_word_embeddings=True,
        use_sliding_window=False, attn_implementation=cfg.attn_implementation)


def lm_config_from_qwen_folder(folder: str | Path, base: LMConfig | None = None) -> tuple[LMConfig, int]:
    """Backbone sizes and text vocabulary from a CosyVoice-BlankEN folder's ``config.json``.

    Only the json is read: ``model.safetensors`` is redundant because ``llm.pt`` overwrites every
    weight (NOTES.md §1). The speech-side fields (ids, mix ratio, sampling) come from ``base``.
    """
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no Qwen config.json in {folder}")
    try:
        q = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(q, dict):
        raise ValueError(f"{path} must hold a JSON object, got a {type(q).__name__}")
    if q.get("model_type") != "qwen2":
        raise ValueError(f"{path}: model_type {q.get('model_type')!r}, expected 'qwen2'")
    if not q.get("tie_word_embeddings", False) or q.get("hidden_act", "silu") != "silu" or q.get("use_sliding_window"):
        raise ValueError(f"{path}: only the Qwen2.5-0.5B layout (tied embeddings, silu, no sliding window) works")
    rope_theta = q.get("rope_theta", (q.get("rope_parameters") or {}).get("rope_theta", 1e6))
    sizes = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    wrong = [k for k in sizes if isinstance(q.get(k), bool) or not isinstance(q.get(k), int) or q[k] <= 0]
    if wrong:
        raise ValueError(f"{path}: {', '.join(wrong)} must be positive integers")
    cfg = dataclasses.replace(
        base or LMConfig(), hidden_size=q["hidden_size"], intermediate_size=q["intermediate_size"],
        num_hidden_layers=q["num_hidden_layers"], num_attention_heads=q["num_attention_heads"],
        num_key_value_heads=q.get("num_key_value_heads", q["num_attention_heads"]), rope_theta=rope_theta,
        rms_norm_eps=q.get("rms_norm_eps", 1e-6), max_position_embeddings=q.get("max_position_embeddings", 32768))
    return cfg, q["vocab_size"]


class Qwen2Backbone(nn.Module):
    """Qwen2 on input embeddings (the official ``Qwen2Encoder``); hidden states after the final norm."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.model = Qwen2ForCausalLM(config)

    def forward(self, xs: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, H) rows, (B,) valid lengths (right padding) -> (B, T, H) last hidden states."""
        mask = None if lengths is None else torch.arange(xs.size(1), device=xs.device) < lengths.to(xs.device)[:, None]
        return self.model.model(inputs_embeds=xs, attention_mask=mask).last_hidden_state

    def forward_one_step(self, xs: torch.Tensor, cache=None) -> tuple[torch.Tensor, object]:
        """Feed new rows (1, T, H) after the cached ones. No attention mask: the official code passes
        one as long as the *current* input only, which transformers >= 4.57 applies wrongly
        (NOTES.md §9); a single unpadded sequence needs none."""
        out = self.model.model(inputs_embeds=xs, use_cache=True, **{_CACHE_ARG: cache})
        return out.last_hidden_state, out[_CACHE_ARG]

    def static_cache(self, rows: int) -> StaticCache:
        """A KV cache of ``rows`` positions, allocated at its first use and then written in place
        (a fixed address and shape for every later step); the masked empty rows cost attention only."""
        return StaticCache(config=self.model.config, max_cache_len=rows)


class TextSpeechLM(nn.Module):
    """CosyVoice 2's text-speech LM; parameter names equal the official ``llm.pt`` keys."""

    def __init__(self, cfg: LMConfig, text_vocab_size: int):
        super().__init__()
        self.cfg = cfg
        n_out = cfg.speech_token_size + 3
        self.llm_embedding = nn.Embedding(2, cfg.hidden_size)
        self.llm = Qwen2Backbone(qwen2_config(cfg, text_vocab_size))
        self.llm_decoder = nn.Linear(cfg.hidden_size, n_out)
        self.speech_embedding = nn.Embedding(n_out, cfg.hidden_size)
        # training-only alignment aid (minicosy.lm_align), absent in the paper's recipe and in llm.pt
        self.align_head = AlignmentHead(cfg.hidden_size, text_vocab_size) if cfg.align_ctc_weight > 0 else None
        self._compiled_step = None     # set by compile_decode_step

    @classmethod
    def from_qwen_folder(cls, folder: str | Path, cfg: LMConfig | None = None) -> TextSpeechLM:
        """Full-size (or golden tiny) layout from a CosyVoice-BlankEN ``config.json``; random weights."""
        return cls(*lm_config_from_qwen_folder(folder, cfg))

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> TextSpeechLM:
        """A model trained by :func:`train_lm` (``save_checkpoint`` format), in eval mode."""
        return model_from_checkpoint(path, lambda mc: cls(
            LMConfig(**{**mc["cfg"], "mix_ratio": tuple(mc["cfg"]["mix_ratio"])}), mc["text_vocab_size"]))

    def model_config(self) -> dict:
        """What :meth:`from_checkpoint` needs to rebuild the module."""
        return {"cfg": dataclasses.asdict(self.cfg), "text_vocab_size": self.text_vocab_size}

    @property
    def text_vocab_size(self) -> int:
        return self.llm.model.config.vocab_size

    # ----- rows of the sequence ---------------------------------------------------------------
    def _ids(self, ids: Ids | None, upper: int, what: str) -> torch.Tensor:
        """One utterance's ids as a 1-D LongTensor on the model's device, range-checked."""
        device = self.llm_decoder.weight.device
        if ids is None:
            return torch.zeros(0, dtype=torch.long, device=device)
        ids = torch.as_tensor(ids, device=device).long()
        if ids.dim() == 2 and ids.size(0) == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise ValueError(f"{what}: expected ids of shape (T,) or (1, T), got {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= upper):
            raise ValueError(f"{what}: ids must lie in [0, {upper}), got min {int(ids.min())} max {int(ids.max())}")
        return ids

    def embed_text(self, ids: Ids | None, what: str = "text") -> torch.Tensor:
        """(T,) text ids -> (T, H) rows of Qwen's ``embed_tokens``."""
        return self.llm.model.model.embed_tokens(self._ids(ids, self.text_vocab_size, what))

    def embed_speech(self, ids: Ids | None, what: str = "speech tokens") -> torch.Tensor:
        """(T,) speech ids (codes, or EOS/fill) -> (T, H) rows of ``speech_embedding``."""
        return self.speech_embedding(self._ids(ids, self.cfg.speech_token_size + 3, what))

    def _special(self, index: int) -> torch.Tensor:
        """(1, H) row of ``llm_embedding``: sos (0) or task_id (1)."""
        return self.llm_embedding.weight[index][None]

    # ----- training ---------------------------------------------------------------------------
    def _layout(self, text: torch.Tensor, speech: torch.Tensor, groups: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input rows, targets and a speech-row mask of one utterance with ``groups`` leading
        [N text, M speech] groups (0 groups = the unistream sequence)."""
        (n, m), fill, eos = self.cfg.mix_ratio, self.cfg.fill_id, self.cfg.eos_id
        text_emb, speech_emb = self.embed_text(text), self.embed_speech(speech)
        rows, target, kinds = [self._special(self.cfg.sos_id)], [IGNORE_ID], [False]
        for j in range(groups):
            rows += [text_emb[j * n:(j + 1) * n], speech_emb[j * m:(j + 1) * m]]
            target += [IGNORE_ID] * (n - 1) + speech[j * m:(j + 1) * m].tolist() + [fill]
            kinds += [False, True]
        rows += [text_emb[groups * n:], self._special(self.cfg.task_id), speech_emb[groups * m:]]
        target += [IGNORE_ID] * (len(text) - groups * n) + speech[groups * m:].tolist() + [eos]
        kinds += [False, False, True]
        is_speech = torch.cat([torch.full((len(r),), kind, dtype=torch.bool) for r, kind in zip(rows, kinds)])
        return torch.cat(rows), torch.tensor(target, dtype=torch.long, device=rows[0].device), is_speech

    def prepare_lm_input_target(self, text_token: torch.Tensor, text_token_len: torch.Tensor,
                                speech_token: torch.Tensor, speech_token_len: torch.Tensor,
                                rng: random.Random | torch.Generator | None = None,
                                bistream: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Padded training batch ``(lm_target (B,L), lm_input (B,L,H), lm_input_len (B,))`` (see
        :meth:`_batch`)."""
        return self._batch(text_token, text_token_len, speech_token, speech_token_len, rng, bistream)[:3]

    def _batch(self, text_token: torch.Tensor, text_token_len: torch.Tensor, speech_token: torch.Tensor,
               speech_token_len: torch.Tensor, rng: random.Random | torch.Generator | None = None,
               bistream: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list]:
        """Padded training batch ``(lm_target (B,L), lm_input (B,L,H), lm_input_len (B,))``, the
        speech-row mask (B, L) and the utterances' text ids (for :mod:`minicosy.lm_align`).

        Per utterance the bistream layout is used when a coin flip is < 0.5 AND
        speech_len/text_len > M/N (official rule). The coin comes from ``rng`` (a
        ``random.Random``, a ``torch.Generator``, or Python's global ``random`` when None);
        ``bistream`` forces the coin (the length condition still applies). Inputs are padded with
        -1.0 and targets with -1 (IGNORE_ID), as official.
        """
        n, m = self.cfg.mix_ratio
        targets, inputs, speech_rows, texts = [], [], [], []
        for i in range(text_token.size(0)):
            text = self._ids(text_token[i, :int(text_token_len[i])], self.text_vocab_size, "text_token")
            speech = self._ids(speech_token[i, :int(speech_token_len[i])], self.cfg.speech_token_size, "speech_token")
            heads = _coin(rng) < 0.5 if bistream is None else bistream
            groups = len(text) // n if heads and len(speech) * n > len(text) * m else 0
            rows, target, is_speech = self._layout(text, speech, groups)
            inputs.append(rows)
            targets.append(target)
            speech_rows.append(is_speech)
            texts.append(text)
        lm_input_len = torch.tensor([len(r) for r in inputs], dtype=torch.int32)
        return (pad_sequence(targets, batch_first=True, padding_value=IGNORE_ID),
                pad_sequence(inputs, batch_first=True, padding_value=IGNORE_ID), lm_input_len,
                pad_sequence(speech_rows, batch_first=True, padding_value=False), texts)

    def forward(self, text_token: torch.Tensor, text_token_len: torch.Tensor, speech_token: torch.Tensor,
                speech_token_len: torch.Tensor, rng: random.Random | torch.Generator | None = None,
                bistream: bool | None = None) -> dict[str, torch.Tensor]:
        """Training step (official ``Qwen2LM.forward``): ``{'loss', 'acc', 'logits', 'target'}``; with
        ``cfg.align_ctc_weight`` > 0 also ``'align_ctc'`` (:mod:`minicosy.lm_align`), added to the
        loss with that weight."""
        target, lm_input, lm_input_len, speech_rows, texts = self._batch(
            text_token, text_token_len, speech_token, speech_token_len, rng, bistream)
        hidden = self.llm(lm_input, lm_input_len)
        logits = self.llm_decoder(hidden)
        out = {"loss": lm_loss(logits, target), "acc": lm_accuracy(logits, target), "logits": logits, "target": target}
        if self.align_head is not None:
            out["align_ctc"] = self.align_head.loss(hidden, speech_rows.to(hidden.device), texts)
            out["loss"] = out["loss"] + self.cfg.align_ctc_weight * out["align_ctc"]
        return out

    # ----- inference --------------------------------------------------------------------------
    def _logp(self, hidden: torch.Tensor) -> torch.Tensor:
        """(1, T, H) last hidden states -> (V,) float32 log-probs after the last row."""
        return self.llm_decoder(hidden[0, -1]).float().log_softmax(dim=-1)

    def _next_logp(self, row: torch.Tensor, cache: StaticCache) -> torch.Tensor:
        return self._logp(self.llm.forward_one_step(row, cache)[0])

    @torch.inference_mode()
    def step(self, rows: torch.Tensor, cache=None) -> tuple[torch.Tensor, object]:
        """Feed (1, T, H) rows after the cached ones; (V,) float32 log-probs of the next token."""
        hidden, cache = self.llm.forward_one_step(rows, cache)
        return self._logp(hidden), cache

    @torch.inference_mode()
    def static_step(self, row: torch.Tensor, cache: StaticCache) -> torch.Tensor:
        """One decode step, row (1, 1, H), into a static cache (in place): the compiled step when
        :meth:`compile_decode_step` was called, else the eager one. (V,) float32 log-probs, a fresh
        tensor (a CUDA graph's output is overwritten by its next replay)."""
        if self._compiled_step is None:
            return self._next_logp(row, cache)
        return self._compiled_step(row, cache).clone()

    def compile_decode_step(self, mode: str | None = None, **options) -> None:
        """Compile the one-token decode step once (``torch.compile``) for static-cache decoding, whose
        fixed shapes let one graph serve every step of every request. ``mode`` defaults to
        "reduce-overhead" on CUDA (the step is captured as one CUDA graph: no per-kernel launch
        cost, which bounds a 0.5 B decoder's step on a GPU) and "default" elsewhere; ``options`` go to
        ``torch.compile`` (e.g. ``backend="eager"`` to check the tracing alone)."""
        mode = mode or ("reduce-overhead" if self.llm_decoder.weight.is_cuda else "default")
        self._compiled_step = torch.compile(self._next_logp, mode=mode, dynamic=False, **options)

    def _sampler(self, sampling: str | Sampler, generator: torch.Generator | None) -> Sampler:
        if callable(sampling):
            return sampling
        if sampling == "ras":
            c = self.cfg
            return functools.partial(ras_sampling, top_p=c.top_p, top_k=c.top_k, win_size=c.win_size,
                                     tau_r=c.tau_r, generator=generator)
        if sampling == "greedy":
            return greedy_sampling
        raise ValueError(f"sampling must be 'ras', 'greedy' or a callable, got {sampling!r}")

    def _pick(self, logp: torch.Tensor, history: list[int], sampler: Sampler, masked: tuple[int, ...] = ()) -> int:
        """One sampled id, the ids ``masked`` set to -inf first. Before ``min_len`` every stop id
        (6561-6563) is masked: the official code masks only 6561 (NOTES.md §2), so a 6562 or 6563
        drawn early ends generation there, even at once (empty audio); minicosy enforces the
        minimum length."""
        if masked:
            logp[list(masked)] = -float("inf")
        return sampler(logp, history)

    def inference(self, text: Ids, prompt_text: Ids | None = None, prompt_speech_token: Ids | None = None, *,
                  sampling: str | Sampler = "ras", generator: torch.Generator | None = None,
                  min_token_text_ratio: float | None = None,
                  max_token_text_ratio: float | None = None, static_cache: bool = False) -> Iterator[int]:
        """Non-streaming generation: ICL [sos, prompt_text+text, task_id, prompt_speech] or, without
        prompts, SFT [sos, text, task_id] (§2.3). Yields speech ids (no stop id) one by one.

        min_len/max_len = ratio x len(text) (prompt text excluded); the stop ids are masked before
        min_len; any of 6561-6563 ends generation. ``sampling``: 'ras' (with ``generator``), 'greedy' or a
        :data:`Sampler`. ``static_cache``: decode into a KV cache of prefix + max_len rows allocated
        once (same tokens; see :meth:`compile_decode_step`).
        """
        if not isinstance(static_cache, bool):
            raise ValueError(f"static_cache must be True or False, got {static_cache!r}")
        text_ids = self._ids(text, self.text_vocab_size, "text")
        if not len(text_ids):
            raise ValueError("text is empty: nothing to synthesise")
        sampler = self._sampler(sampling, generator)
        with torch.inference_mode():
            rows = torch.cat([self._special(self.cfg.sos_id), self.embed_text(prompt_text, "prompt_text"),
                              self.embed_text(text_ids), self._special(self.cfg.task_id),
                              self.embed_speech(prompt_speech_token, "prompt_speech_token")])
        min_ratio = self.cfg.min_token_text_ratio if min_token_text_ratio is None else min_token_text_ratio
        max_ratio = self.cfg.max_token_text_ratio if max_token_text_ratio is None else max_token_text_ratio
        min_len, max_len = int(len(text_ids) * min_ratio), int(len(text_ids) * max_ratio)
        return self._decode(rows[None], sampler, min_len, max_len, static_cache)

    @torch.inference_mode()
    def _decode(self, rows: torch.Tensor, sampler: Sampler, min_len: int, max_len: int,
                static_cache: bool = False) -> Iterator[int]:
        out: list[int] = []
        cache = self.llm.static_cache(rows.shape[1] + max_len) if static_cache else None
        for i in range(max_len):
            if static_cache and i:                       # one row into the fixed-shape cache
                logp = self.static_step(rows, cache)
            else:                                        # the prefill, or any step of the dynamic cache
                logp, cache = self.step(rows, cache)
            token = self._pick(logp, out, sampler, self.cfg.stop_ids if i < min_len else ())
            if token in self.cfg.stop_ids:
                return
            yield token
            out.append(token)
            rows = self.speech_embedding.weight[token].reshape(1, 1, -1)

    def _text_chunks(self, text: Ids | Iterable[Ids]) -> Iterator[torch.Tensor]:
        """Text known in advance is cut into N-token chunks; any other iterable yields its chunks."""
        flat = isinstance(text, (list, tuple)) and all(isinstance(t, numbers.Integral) for t in text)
        if flat or isinstance(text, torch.Tensor):
            yield from self._ids(text, self.text_vocab_size, "text").split(self.cfg.mix_ratio[0])
        else:
            for chunk in text:
                yield self._ids(chunk, self.text_vocab_size, "text chunk")

    def inference_bistream(self, text: Ids | Iterable[Ids], prompt_text: Ids | None = None,
                           prompt_speech_token: Ids | None = None, *, sampling: str | Sampler = "ras",
                           generator: torch.Generator | None = None, min_token_text_ratio: float | None = None,
                           max_token_text_ratio: float | None = None) -> Iterator[int]:
        """Streaming generation (§2.3 "ICL/SFT, Streaming"; official ``inference_bistream``).

        ``text`` may be a generator of text-id chunks that are still being produced (text-in
        streaming). Prompt text and prompt speech are interleaved N:M first; then after each fill
        token (sampled, or forced once M speech tokens follow the last group) the next N text ids
        are appended; when the text ends, the rest of the text, task_id and any prompt speech left
        are appended and decoding runs to a stop id. EOS (and the unused 6562) is masked while text is
        still coming.

        Deviations from the official code, which (a) feeds the row that produced the last fill a
        second time when the text ends, (b) drops prompt speech that could not be interleaved
        and (c) raises on 6562 / on a fill after the text: rows are fed once, leftover prompt
        speech follows task_id (the training layout), any stop id ends generation, and the final
        phase stops after ``max_token_text_ratio x len(text)`` speech tokens and cannot stop before
        ``min_token_text_ratio x len(text)`` (the official streaming decode has no minimum length).
        """
        prompt_text_ids = self._ids(prompt_text, self.text_vocab_size, "prompt_text")
        prompt_speech = self._ids(prompt_speech_token, self.cfg.speech_token_size, "prompt_speech_token")
        min_ratio = self.cfg.min_token_text_ratio if min_token_text_ratio is None else min_token_text_ratio
        max_ratio = self.cfg.max_token_text_ratio if max_token_text_ratio is None else max_token_text_ratio
        return self._decode_bistream(self._text_chunks(text), prompt_text_ids, prompt_speech,
                                     self._sampler(sampling, generator), min_ratio, max_ratio)

    @torch.inference_mode()
    def _decode_bistream(self, chunks: Iterator[torch.Tensor], prompt_text: torch.Tensor, prompt_speech: torch.Tensor,
                         sampler: Sampler, min_ratio: float, max_ratio: float) -> Iterator[int]:
        (n, m), fill = self.cfg.mix_ratio, self.cfg.fill_id
        interleaved = (self.cfg.eos_id, self.cfg.eos_id + 1)  # while text comes, only a fill may pause
        pending = [self._special(self.cfg.sos_id)]          # rows not fed yet
        text_left, speech_left = self.embed_text(prompt_text), self.embed_speech(prompt_speech)
        history: list[int] = []                              # generated ids, fill tokens included
        cache, n_text, n_speech = None, 0, 0
        next_fill = (len(prompt_speech) // m + 1) * m - len(prompt_speech)
        for chunk in chunks:
            n_text += len(chunk)
            text_left = torch.cat([text_left, self.embed_text(chunk)])
            while len(speech_left) and len(text_left) >= n:  # interleave the prompt N:M
                pending += [text_left[:n], speech_left[:m]]
                text_left, speech_left = text_left[n:], speech_left[m:]
            if len(speech_left):
                continue
            if history[-1:] == [fill] or (not history and len(pending) == 1):  # the LM waits for text
                if len(text_left) < n:
                    continue
                pending.append(text_left[:n])
                text_left = text_left[n:]
            while True:                                      # decode until the next fill token
                logp, cache = self.step(torch.cat(pending)[None], cache)
                pending = []
                token = fill if len(history) == next_fill else self._pick(logp, history, sampler, interleaved)
                if token == fill:
                    next_fill = len(history) + m + 1
                history.append(token)
                if token == fill:
                    break
                if token in self.cfg.stop_ids:
                    return
                yield token
                n_speech += 1
                pending = [self.speech_embedding.weight[token][None]]
        pending += [text_left, self._special(self.cfg.task_id), speech_left]
        while n_speech < int(n_text * max_ratio):            # text is complete: decode to a stop id
            logp, cache = self.step(torch.cat(pending)[None], cache)
            token = self._pick(logp, history, sampler, self.cfg.stop_ids if n_speech < int(n_text * min_ratio) else ())
            history.append(token)
            if token in self.cfg.stop_ids:
                return
            yield token
            n_speech += 1
            pending = [self.speech_embedding.weight[token][None]]


def _coin(rng: random.Random | torch.Generator | None) -> float:
    """A uniform draw in [0, 1) from ``rng``, or from Python's global ``random`` (as official) when None."""
    if isinstance(rng, torch.Generator):
        return torch.rand(1, generator=rng).item()
    return (rng or random).random()


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the 6564 classes, ignoring -1, divided by the number of counted tokens
    (official LabelSmoothingLoss with smoothing 0 and length normalisation)."""
    return F.cross_entropy(logits.flatten(0, -2).float(), target.flatten(), ignore_index=IGNORE_ID, reduction="sum") \
        / (target != IGNORE_ID).sum().clamp(min=1)


def lm_accuracy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Share of non-ignored positions whose arg-max equals the target (official ``th_accuracy``)."""
    keep = target != IGNORE_ID
    return (logits.argmax(-1)[keep] == target[keep]).float().mean().detach()


def load_official_llm(checkpoint: str | Path | Mapping[str, torch.Tensor], lm: TextSpeechLM | None = None, *,
                      qwen_dir: str | Path | None = None, cfg: LMConfig | None = None,
                      dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> TextSpeechLM:
    """Load an official ``llm.pt`` (path or state dict) strictly, like ``CosyVoiceModel.load``.

    The module is ``lm`` if given, else built from ``qwen_dir``'s config.json, else from ``cfg``
    with the text vocabulary read off the checkpoint. Wrong keys or shapes raise a ``ValueError``
    listing missing keys, unexpected keys and shape conflicts. ``dtype`` (e.g. ``torch.float16``)
    is applied after loading.
    """
    if isinstance(checkpoint, Mapping):
        state, what = checkpoint, "state dict"
    else:
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"LLM checkpoint not found: {checkpoint}")
        state, what = read_torch_file(checkpoint), str(checkpoint)
        if not isinstance(state, Mapping):
            raise ValueError(f"{checkpoint} holds a {type(state).__name__}, not a state dict")
    if lm is None:
        if qwen_dir is not None:
            lm = TextSpeechLM.from_qwen_folder(qwen_dir, cfg)
        elif cfg is not None:
            embed = state.get("llm.model.model.embed_tokens.weight")
            if embed is None:
                raise ValueError(f"{what} has no llm.model.model.embed_tokens.weight: not a CosyVoice 2 llm.pt")
            lm = TextSpeechLM(cfg, embed.shape[0])
        else:
            raise ValueError("load_official_llm needs a module (lm), a Qwen folder (qwen_dir) or an LMConfig (cfg)")
    load_state_dict_checked(lm, state, what)
    return lm.to(device=device, dtype=dtype).eval()
