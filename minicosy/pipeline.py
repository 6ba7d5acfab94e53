"""CosyVoice 2 end to end (Fig. 1): text -> LM speech tokens -> flow mel -> HiFT waveform, offline or
streaming (§2.5), with the official ``CosyVoice2`` API (NOTES.md §3, §7).

Usage::

    tts = CosyVoice2.from_pretrained("tiny-phone")                 # or an official CosyVoice2-0.5B folder
    for out in tts.inference_zero_shot("Hello there.", "Transcript of the prompt.", "prompt.wav", stream=True):
        play(out["tts_speech"])                                     # (1, samples) at 24 kHz
        print(out["timings"], out["totals"]["first_package_s"])

Every request keeps its state (LM cache, token offset, hop, flow caches, vocoder cache, random
generator) in its own generator, so several requests can be interleaved freely.
"""
from __future__ import annotations

import math
import numbers
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .campplus import CAMPPlus, load_speaker_table
from .config import MiniCosyConfig, get_config
from .flow import CausalMaskedDiffWithXvec, FlowStreamer, PromptState, prompt_state
from .frontend import Frontend, Prompt, PromptAudio
from .hift import HiFTGenerator, VocoderStream
from .instruct import END_OF_PROMPT
from .lm import TextSpeechLM
from .speech_tokenizer import SpeechTokenizer
from .text_tokenizer import load_text_tokenizer

TINY_DIR = Path(__file__).resolve().parents[1] / "data" / "checkpoints"
# The project's own checkpoint folders by name: "tiny", the first tiny chain (BPE text, 6561 codes,
# 1.4 h of speech), and "tiny-phone", the same sizes retrained on the large corpus with reading
# units as text and 729 speech codes (issue 20: the tiny model that speaks); "tiny-phone-instruct",
# its LM continued with the large instruct sub-corpus mixed in (§2.6), the rest the same
TINY_MODELS = {"tiny": TINY_DIR, "tiny-phone": TINY_DIR / "tiny_phone", "tiny-phone-instruct": TINY_DIR / "tiny_phone_instruct"}


@dataclass
class Request:
    """One sentence's inputs: LM text and prompts, flow prompt and x-vector (official ``model_input``)."""

    text: list[int] | Iterator[list[int]]   # ids, or a stream of id chunks (text-in streaming)
    lm_prompt_text: list[int]
    lm_prompt_speech: torch.Tensor           # (1, P') int64, may be empty
    flow_prompt_token: torch.Tensor          # (1, P) int64, may be empty
    flow_prompt_feat: torch.Tensor           # (1, 2P, 80)
    embedding: torch.Tensor                  # (1, 192)
    flow_state: PromptState | None = None    # a registered prompt's precomputed flow chunks


class _Clock:
    """Seconds spent per stage, for the current chunk and for the whole request (all its sentences);
    ``end_s`` and ``first_package_s`` count from the request's start."""

    STAGES = ("frontend_s", "lm_s", "flow_s", "vocoder_s")

    def __init__(self, start: float, frontend_s: float) -> None:
        self.start = start
        self.chunk = dict.fromkeys(self.STAGES, 0.0)
        self.chunk["frontend_s"] = frontend_s
        self.total = dict(self.chunk, tokens=0, audio_s=0.0, chunks=0)
        self.first_package_s: float | None = None

    def add(self, stage: str, seconds: float) -> None:
        self.chunk[stage] += seconds
        self.total[stage] += seconds

    def emit(self, speech: torch.Tensor, tokens: int, sample_rate: int, extra: dict) -> dict:
        if not torch.isfinite(speech).all():        # never handed out as a result
            raise RuntimeError("the synthesis produced NaN/Inf audio: a model's weights or inputs are not finite")
        now = time.perf_counter() - self.start
        if self.first_package_s is None:
            self.first_package_s = now
        audio_s = speech.shape[1] / sample_rate
        self.total.update(tokens=self.total["tokens"] + tokens, audio_s=self.total["audio_s"] + audio_s,
                          chunks=self.total["chunks"] + 1)
        compute = sum(self.total[s] for s in self.STAGES)
        totals = dict(self.total, first_package_s=self.first_package_s, elapsed_s=now,
                      rtf=compute / self.total["audio_s"] if self.total["audio_s"] else float("nan"))
        out = {"tts_speech": speech, "timings": dict(self.chunk, tokens=tokens, audio_s=audio_s, end_s=now),
               "totals": totals, **extra}
        self.chunk = dict.fromkeys(self.STAGES, 0.0)
        return out


def join_speech(outputs: Iterable[dict]) -> torch.Tensor:
    """The whole utterance (1, samples) from a request's output dicts (streaming chunks or sentences)."""
    return torch.cat([o["tts_speech"] for o in outputs], dim=1)


def eq11_latency(totals: dict, m: int) -> dict[str, float]:
    """Eq. 11 of the paper, L_TTS = M·d_lm + M·d_fm + M·d_voc, with the per-token costs of a finished
    request (``totals`` of its last chunk) and M tokens in the first package."""
    n = max(totals["tokens"], 1)
    d = {k: totals[f"{k}_s"] / n for k in ("lm", "flow", "vocoder")}
    return {"d_lm": d["lm"], "d_fm": d["flow"], "d_voc": d["vocoder"], "M": m, "L_TTS": m * sum(d.values())}


class CosyVoice2:
    """Zero-shot, cross-lingual, instructed and speaker-id synthesis, offline or streaming.

    Methods keep the official names and semantics; each returns a generator of dicts with
    ``tts_speech`` (1, samples) float32 at 24 kHz, plus ``timings`` (this chunk's stage seconds)
    and ``totals`` (the request so far: stage seconds, tokens, audio seconds, RTF and the measured
    first-package latency of eq. 11). Extra keyword arguments (minicosy's): ``seed`` (per-request
    random generator), ``incremental`` (streaming flow that caches past chunks, see
    :class:`~minicosy.flow.FlowStreamer`), ``static_cache`` (the LM decodes into a KV cache
    allocated once, see :meth:`~minicosy.lm.TextSpeechLM.compile_decode_step`; text known in
    advance only).

    ``dtype`` is the LM's and flow's (as the official ``fp16``); ``hift_dtype`` runs HiFT's
    convolutions in half precision too, its STFT/iSTFT staying float32 (officially HiFT is float32)."""

    def __init__(self, frontend: Frontend, lm: TextSpeechLM, flow: CausalMaskedDiffWithXvec, hift: HiFTGenerator,
                 config: MiniCosyConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 model_dir: str | Path | None = None, spk2info: dict | None = None,
                 hift_dtype: torch.dtype | None = None) -> None:
        self.device = torch.device(device)
        self.dtype = dtype or torch.float32
        self.frontend, self.config, self.model_dir = frontend, config, Path(model_dir) if model_dir else None
        self.lm = lm.to(self.device, self.dtype).eval()
        self.flow = flow.to(self.device, self.dtype).eval()
        self.hift = hift.to(self.device).eval().convolutions_in(_check_dtype(hift_dtype) or torch.float32)
        self.spk2info: dict[str, dict] = {k: dict(v) for k, v in (spk2info or {}).items()}
        for info in self.spk2info.values():            # as written by save_spkinfo
            if isinstance(info.get("prompt"), dict):
                info["prompt"] = Prompt(**info["prompt"])
        self.sample_rate = config.features.sample_rate

    # ---- loading ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path = "tiny", device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, hift_dtype: torch.dtype | None = None) -> "CosyVoice2":
        """An official CosyVoice2-0.5B folder (``cosyvoice2.yaml``, ``llm.pt``, ``flow.pt``,
        ``hift.pt``, ``CosyVoice-BlankEN/``, ``campplus.onnx``, ``speech_tokenizer_v2.onnx``) or a
        minicosy checkpoint folder (``minicosy.json``); ``"tiny"``, ``"tiny-phone"`` and ``"tiny-phone-instruct"`` name the project's
        own (:data:`TINY_MODELS`).
        ``device`` defaults to CPU; ``dtype`` (e.g. ``torch.float16``) applies to the LM and flow,
        ``hift_dtype`` to HiFT's convolutions."""
        from .official import read_official_folder

        device, dtype, hift_dtype = _check_device(device), _check_dtype(dtype), _check_dtype(hift_dtype)
        folder = TINY_MODELS.get(str(path)) or resolve_model_folder(path)
        if (folder / "cosyvoice2.yaml").exists():
            parts = read_official_folder(folder)
        elif (folder / "minicosy.json").exists():
            parts = _read_minicosy_folder(folder)
        else:
            raise FileNotFoundError(f"{folder} is not a CosyVoice 2 folder: expected cosyvoice2.yaml (official "
                                    "CosyVoice2-0.5B) or minicosy.json (a minicosy checkpoint folder)")
        return cls(**parts, device=device, dtype=dtype, model_dir=folder, hift_dtype=hift_dtype)

    # ---- speakers ----------------------------------------------------------------------------
    def list_available_spks(self) -> list[str]:
        return sorted(self.spk2info)

    def add_zero_shot_spk(self, prompt_text: str, prompt_wav: PromptAudio, zero_shot_spk_id: str) -> bool:
        """Process a prompt once and keep it under ``zero_shot_spk_id`` for later requests (also usable
        by :meth:`inference_sft`, which then takes only its x-vector). The first incremental
        streaming request of the speaker also keeps the prompt's leading flow chunks (a
        :class:`~minicosy.flow.PromptState`), so that later ones start after them."""
        if not zero_shot_spk_id:
            raise ValueError("zero_shot_spk_id must be a non-empty string")
        prompt = self.frontend.prompt(prompt_wav, prompt_text)
        self.spk2info[zero_shot_spk_id] = {"prompt": prompt, "embedding": prompt.embedding}
        return True

    def save_spkinfo(self, path: str | Path | None = None) -> Path:
        """Write the registered speakers (``spk2info.pt`` in the model folder by default)."""
        path = Path(path) if path else (self.model_dir or Path(".")) / "spk2info.pt"
        torch.save({k: {"embedding": v["embedding"], **({"prompt": vars(v["prompt"])} if "prompt" in v else {})}
                    for k, v in self.spk2info.items()}, path)
        return path

    def _prompt(self, prompt_wav: PromptAudio | None, prompt_text: str | None, spk_id: str,
                text_frontend: bool, incremental: bool = False) -> tuple[Prompt, PromptState | None]:
        if not isinstance(spk_id, str):
            raise ValueError(f"zero_shot_spk_id must be a str, got {type(spk_id).__name__}")
        if spk_id:
            info = self.spk2info.get(spk_id, {})
            if "prompt" not in info:
                raise ValueError(f"unknown zero-shot speaker {spk_id!r}; registered: {self.list_available_spks()}")
            p = info["prompt"]
            if incremental and "flow_state" not in info:
                info["flow_state"] = prompt_state(self.flow, p.speech_token.to(self.device),
                                                  p.speech_feat.to(self.device, self.dtype),
                                                  p.embedding.to(self.device, self.dtype))
            return p, info.get("flow_state")
        if prompt_wav is None or (isinstance(prompt_wav, str) and not prompt_wav):
            raise ValueError("prompt_wav is required (or a registered zero_shot_spk_id)")
        return self.frontend.prompt(prompt_wav, prompt_text, text_frontend), None

    # ---- the official inference methods --------------------------------------------------------
    def inference_zero_shot(self, tts_text: str | Iterable[str], prompt_text: str, prompt_wav: PromptAudio | None,
                            zero_shot_spk_id: str = "", stream: bool = False, speed: float = 1.0,
                            text_frontend: bool = True, **kw) -> Iterator[dict]:
        """In-context learning (§2.3): the LM continues the prompt's text and speech tokens; the flow
        gets the prompt tokens, mel and x-vector. With ``lm.cfg.in_context_prompt`` off (a tiny
        model's setting) only the flow gets the prompt, as in :meth:`inference_cross_lingual`."""
        if not zero_shot_spk_id and (not isinstance(prompt_text, str) or not prompt_text.strip()):
            raise ValueError("prompt_text is required for zero-shot synthesis (the transcript of prompt_wav)")
        start = time.perf_counter()
        p, state = self._prompt(prompt_wav, prompt_text, zero_shot_spk_id, text_frontend, kw.get("incremental", False))
        lm_text, lm_speech = (p.text_ids, p.speech_token) if self.lm.cfg.in_context_prompt else ([], _no_tokens())
        yield from self._run(tts_text, text_frontend, lambda text: Request(
            text, lm_text, lm_speech, p.speech_token, p.speech_feat, p.embedding, state), stream, speed, start, **kw)

    def inference_cross_lingual(self, tts_text: str | Iterable[str], prompt_wav: PromptAudio | None,
                                zero_shot_spk_id: str = "", stream: bool = False, speed: float = 1.0,
                                text_frontend: bool = True, **kw) -> Iterator[dict]:
        """The LM gets no prompt (so the prompt's language does not leak into the text); the flow keeps
        the prompt's timbre."""
        start = time.perf_counter()
        p, state = self._prompt(prompt_wav, None, zero_shot_spk_id, text_frontend, kw.get("incremental", False))
        yield from self._run(tts_text, text_frontend, lambda text: Request(
            text, [], _no_tokens(), p.speech_token, p.speech_feat, p.embedding, state), stream, speed, start, **kw)

    def inference_instruct2(self, tts_text: str | Iterable[str], instruct_text: str, prompt_wav: PromptAudio | None,
                            zero_shot_spk_id: str = "", stream: bool = False, speed: float = 1.0,
                            text_frontend: bool = True, **kw) -> Iterator[dict]:
        """Instructed generation (§2.6): the instruction (ending in ``<|endofprompt|>``, added when
        missing; not normalised) takes the place of the LM's prompt text, without prompt speech
        tokens; the flow uses the prompt audio."""
        if not isinstance(instruct_text, str) or not instruct_text.replace(END_OF_PROMPT, "").strip():
            raise ValueError("instruct_text is empty: say how to speak, e.g. 'Please speak very fast.<|endofprompt|>'")
        if not instruct_text.endswith(END_OF_PROMPT):
            instruct_text += END_OF_PROMPT
        start = time.perf_counter()
        p, state = self._prompt(prompt_wav, None, zero_shot_spk_id, text_frontend, kw.get("incremental", False))
        ids = self.frontend.text_ids(instruct_text, normalize=False)
        yield from self._run(tts_text, text_frontend, lambda text: Request(
            text, ids, _no_tokens(), p.speech_token, p.speech_feat, p.embedding, state), stream, speed, start, **kw)

    def inference_sft(self, tts_text: str | Iterable[str], spk_id: str, stream: bool = False, speed: float = 1.0,
                      text_frontend: bool = True, **kw) -> Iterator[dict]:
        """A known speaker by id (§2.7): LM without prompts, flow with the speaker's x-vector only."""
        if not isinstance(spk_id, str) or spk_id not in self.spk2info:
            raise ValueError(f"unknown speaker id {spk_id!r}; available: {self.list_available_spks()}")
        start = time.perf_counter()
        emb = self.spk2info[spk_id]["embedding"].reshape(1, -1).float()
        n_mels = self.config.flow.n_mels
        yield from self._run(tts_text, text_frontend, lambda text: Request(
            text, [], _no_tokens(), _no_tokens(), torch.zeros(1, 0, n_mels), emb), stream, speed, start, **kw)

    # ---- orchestration ---------------------------------------------------------------------------
    @torch.inference_mode()
    def vocode(self, mel: torch.Tensor, seed: int = 0) -> np.ndarray:
        """24 kHz waveform of one whole mel (1, 80, T) through HiFT, its source noise seeded (no
        streaming cache): how the evaluations render token-level experiments."""
        generator = torch.Generator(self.device).manual_seed(seed)
        return self.hift.inference(mel.float().to(self.device), generator=generator)[0][0].cpu().numpy()

    def _run(self, tts_text: str | Iterable[str], text_frontend: bool, make, stream: bool, speed: float,
             start: float, seed: int | None = None, incremental: bool = False,
             static_cache: bool = False) -> Iterator[dict]:
        seed = check_request(speed, seed, stream, incremental, static_cache)
        if static_cache and not isinstance(tts_text, str):
            raise ValueError("static_cache needs the whole text in advance (its length sizes the KV cache); "
                             "text-in streaming (an iterable of str) decodes with the growing cache")
        if stream and speed != 1.0:
            raise ValueError("speed != 1 works with stream=False only (the official code asserts the same)")
        if isinstance(tts_text, (bytes, bytearray, dict)) or not isinstance(tts_text, (str, Iterable)):
            raise ValueError(f"tts_text must be a str or an iterable of str, got {type(tts_text).__name__}"
                             + (" (decode it first)" if isinstance(tts_text, (bytes, bytearray)) else ""))
        if isinstance(tts_text, str):        # sentences, and a sentence too long for one request in pieces
            ids = [self.frontend.text_ids(s, normalize=False) for s in self.frontend.sentences(tts_text, text_frontend)]
            texts: list = [t[i:i + MAX_PIECE_IDS] for t in ids for i in range(0, len(t), MAX_PIECE_IDS)]
            if not texts:
                raise ValueError(f"text {tts_text[:80]!r} has nothing to say")
        else:
            texts = [self.frontend.text_id_stream(tts_text)]
        # separate generators for LM sampling and the vocoder's source phases, so that a streaming
        # and an offline request with the same seed sample the same speech tokens
        generators = [torch.Generator(self.device).manual_seed(seed + k) if seed is not None else None for k in (0, 1)]
        clock = _Clock(start, time.perf_counter() - start)    # one clock per request: sentences add up
        for i, text in enumerate(texts):
            yield from self._tts(make(text), clock, i, stream, speed, generators, incremental, bool(static_cache))

    def _tts(self, req: Request, clock: _Clock, sentence: int, stream: bool, speed: float,
             generators: list[torch.Generator | None], incremental: bool, static_cache: bool) -> Iterator[dict]:
        lm_gen, voc_gen = generators
        lm_tokens = (self.lm.inference(req.text, req.lm_prompt_text, req.lm_prompt_speech[0], generator=lm_gen,
                                       static_cache=static_cache)
                     if isinstance(req.text, list) else
                     self.lm.inference_bistream(req.text, req.lm_prompt_text, req.lm_prompt_speech[0], generator=lm_gen))
        tokens: list[int] = []

        def pull(n: int) -> bool:
            """Generate until ``n`` tokens are known; False once the LM has stopped."""
            while len(tokens) < n:
                t = time.perf_counter()
                token = next(lm_tokens, None)
                clock.add("lm_s", time.perf_counter() - t)
                if token is None:
                    return False
                tokens.append(token)
            return True

        def timed(stage: str, fn, *args):
            t = time.perf_counter()
            out = fn(*args)
            clock.add(stage, time.perf_counter() - t)
            return out

        prompt = (req.flow_prompt_token.to(self.device), req.flow_prompt_feat.to(self.device, self.dtype),
                  req.embedding.to(self.device, self.dtype))
        sc, done = self.config.streaming, 0
        vocoder = VocoderStream(self.hift, sc.mel_cache_len if stream else 0, sc.source_cache_len, voc_gen)
        if stream:
            flow = FlowStreamer(self.flow, *prompt, hop=sc.token_hop_len, max_hop=sc.token_max_hop_len,
                                scale=sc.stream_scale_factor, incremental=incremental,
                                state=req.flow_state if incremental else None)
            while pull(flow.needed):
                mel = timed("flow_s", flow.chunk, torch.tensor([tokens]))
                speech = timed("vocoder_s", vocoder, mel.float(), False)
                yield clock.emit(speech.cpu(), flow.offset - done, self.sample_rate, {"sentence": sentence})
                done = flow.offset
        else:
            pull(1 << 30)
        if not tokens:       # the LM keeps min_len, so only a text with no speakable unit gets here
            raise ValueError(f"sentence {sentence + 1} has nothing to say: the LM produced no speech for it")
        token = torch.tensor([tokens])
        if stream:
            mel = timed("flow_s", flow.finish, token)
        else:
            mel = timed("flow_s", self.flow.inference, token, *prompt)
            if speed != 1.0:
                mel = F.interpolate(mel, size=max(1, int(mel.shape[2] / speed)), mode="linear")
        speech = timed("vocoder_s", vocoder, mel.float(), True)
        yield clock.emit(speech.cpu(), len(tokens) - done, self.sample_rate, {"sentence": sentence})


MAX_PIECE_IDS = 200         # text ids per LM request: a longer piece (one huge "word") is cut, never a hang
SPEED_RANGE = (0.5, 2.0)    # `speed` stretches the mel (offline only): beyond these it is no longer speech


def check_request(speed: float, seed: int | None, stream: bool, incremental: bool,
                  static_cache: bool = False) -> int | None:
    """Validate a request's options before any work; returns the seed as a Python int. ``speed``
    must be a real number in :data:`SPEED_RANGE`, ``seed`` an integer (any integer type) or None,
    ``stream``, ``incremental`` and ``static_cache`` booleans."""
    if isinstance(speed, (bool, np.bool_)) or not isinstance(speed, numbers.Real) or not math.isfinite(speed) \
            or not SPEED_RANGE[0] <= speed <= SPEED_RANGE[1]:
        raise ValueError(f"speed must be a number from {SPEED_RANGE[0]} to {SPEED_RANGE[1]}, got {speed!r}")
    if seed is not None and (isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral)):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")
    for name, flag in (("stream", stream), ("incremental", incremental), ("static_cache", static_cache)):
        if not isinstance(flag, (bool, np.bool_)):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    return None if seed is None else int(seed)


def _no_tokens() -> torch.Tensor:
    return torch.zeros(1, 0, dtype=torch.long)


HUB_ALIASES = {"iic/CosyVoice2-0.5B": "FunAudioLLM/CosyVoice2-0.5B"}   # ModelScope's name -> Hugging Face's
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_model_folder(path: str | Path) -> Path:
    """A model folder: a path, or a hub name (``FunAudioLLM/CosyVoice2-0.5B``, ModelScope's
    ``iic/CosyVoice2-0.5B``) found offline, never downloaded: ``$MINICOSY_HOME/<name>`` or
    ``$MINICOSY_HOME/<owner>/<name>``, the ModelScope cache, or the Hugging Face cache
    (``snapshot_download(local_files_only=True)``). Anything else is a ``FileNotFoundError``
    saying what to download and where to put it."""
    folder = Path(path)
    if folder.is_dir():
        return folder
    if folder.exists():
        raise FileNotFoundError(f"{folder} is a file; give the model folder that holds it")
    name = str(path)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name) or name.startswith((".", "/")):
        raise FileNotFoundError(f"model folder {folder} does not exist")
    repo = HUB_ALIASES.get(name, name)
    home = Path(os.environ.get("MINICOSY_HOME", Path.home() / ".cache" / "minicosy"))
    candidates = [home / repo.split("/")[1], home / repo, home / name,
                  Path.home() / ".cache" / "modelscope" / "hub" / name, Path.home() / ".cache" / "modelscope" / "hub" / repo]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:                  # not in the cache (or no huggingface_hub): say what to do
        raise FileNotFoundError(
            f"{name} is not on this machine and minicosy never downloads: fetch it yourself (e.g. `huggingface-cli "
            f"download {repo}`) into the Hugging Face cache, or put the folder at {home / repo.split('/')[1]} "
            "($MINICOSY_HOME), or pass its path") from None


def _check_device(device: str | torch.device | None) -> torch.device:
    try:
        device = torch.device(device or "cpu")
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1, mps): {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but torch sees no CUDA GPU")
    return device


def _check_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be torch.float32, float16 or bfloat16 (or 'fp32', 'fp16', 'bf16'), got {dtype!r}")


INFERENCE_FIELDS = {"flow": ("n_timesteps", "cfg_rate"), "lm": ("top_k", "top_p", "in_context_prompt")}


def set_inference(where: Path, settings: object, cfgs: dict[str, object]) -> None:
    """Apply a model folder's ``"inference"`` settings (e.g. ``{"flow": {"cfg_rate": 2.5}}``) to the
    loaded modules' configs: the knobs a checkpoint's training did not fix (:data:`INFERENCE_FIELDS`:
    ODE steps and CFG strength, eq. 10; RAS top-k and top-p, and whether zero-shot synthesis puts the
    prompt in the LM's context, §2.3)."""
    if not isinstance(settings, dict):
        raise ValueError(f"{where}: 'inference' must map 'flow'/'lm' to settings, got {type(settings).__name__}")
    for part, values in settings.items():
        if part not in INFERENCE_FIELDS or not isinstance(values, dict):
            raise ValueError(f"{where}: 'inference' takes {sorted(INFERENCE_FIELDS)} mapped to settings, got {part!r}")
        for name, value in values.items():
            if name not in INFERENCE_FIELDS[part]:
                raise ValueError(f"{where}: inference setting {part}.{name} is not one of {INFERENCE_FIELDS[part]}")
            if name == "in_context_prompt":
                if not isinstance(value, bool):
                    raise ValueError(f"{where}: inference setting lm.in_context_prompt must be true or false, got {value!r}")
                setattr(cfgs[part], name, value)
                continue
            low_ok = name == "cfg_rate"       # CFG strength 0 turns guidance off; the others must be positive
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (value == 0 and not low_ok):
                raise ValueError(f"{where}: inference setting {part}.{name} must be a "
                                 f"{'non-negative' if low_ok else 'positive'} number, got {value!r}")
            setattr(cfgs[part], name, type(getattr(cfgs[part], name))(value))


def _read_minicosy_folder(folder: Path) -> dict:
    """The components of a minicosy checkpoint folder, named in its ``minicosy.json``."""
    import json

    try:
        spec = json.loads((folder / "minicosy.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{folder / 'minicosy.json'} is not valid JSON: {e}") from None
    keys = ("llm", "flow", "hift", "campplus", "speech_tokenizer", "text_tokenizer")
    if not isinstance(spec, dict):
        raise ValueError(f"{folder / 'minicosy.json'} must map {', '.join(keys)} to file names, got a {type(spec).__name__}")
    wrong = [k for k in (*keys, "spk2info") if k in spec and not (isinstance(spec[k], str) and spec[k])
             and not (k == "spk2info" and spec[k] is None)]
    if wrong:
        raise ValueError(f"{folder / 'minicosy.json'}: {', '.join(f'{k!r}' for k in wrong)} must name a file")
    files = {k: folder / spec[k] for k in keys if k in spec}
    missing = [f"{k} ({p.name})" for k, p in files.items() if not p.exists()]
    absent = {"llm", "flow", "hift", "campplus", "speech_tokenizer", "text_tokenizer"} - files.keys()
    if missing or absent:
        raise FileNotFoundError(f"{folder}/minicosy.json: missing files {missing}, keys not given {sorted(absent)}")
    config = get_config(spec.get("preset", "tiny"))
    text_tokenizer = load_text_tokenizer(files["text_tokenizer"])
    frontend = Frontend(text_tokenizer, SpeechTokenizer.from_checkpoint(files["speech_tokenizer"]).eval(),
                        CAMPPlus.from_checkpoint(files["campplus"]), config.features.sample_rate,
                        config.flow.token_mel_ratio)
    spk2info = load_speaker_table(folder / spec["spk2info"]) if spec.get("spk2info") else {}
    flow, lm = CausalMaskedDiffWithXvec.from_checkpoint(files["flow"]), TextSpeechLM.from_checkpoint(files["llm"])
    set_inference(folder / "minicosy.json", spec.get("inference", {}), {"flow": flow.cfg, "lm": lm.cfg})
    config.flow = flow.cfg
    return {"frontend": frontend, "lm": lm, "flow": flow,
            "hift": HiFTGenerator.from_checkpoint(files["hift"]), "config": config, "spk2info": spk2info}


COMPONENTS = ("llm", "flow", "hift", "campplus", "speech_tokenizer", "text_tokenizer", "spk2info")   # minicosy.json's files


def derive_model_folder(base: str | Path, folder: str | Path, **files: str | Path) -> Path:
    """A new minicosy checkpoint folder ``folder`` that is ``base`` (a minicosy folder or a name of
    :data:`TINY_MODELS`) with some components replaced, e.g. ``llm="runs/dpo/lm.pt"``: its
    ``minicosy.json`` names every file relative to ``folder`` and keeps ``base``'s other settings."""
    import json

    base = TINY_MODELS.get(str(base)) or Path(base)
    spec = json.loads((base / "minicosy.json").read_text())
    unknown = sorted(set(files) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"cannot replace {unknown}: not components of a minicosy folder")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    where = {k: base / v for k, v in spec.items() if k in COMPONENTS and isinstance(v, str)}
    where.update({k: Path(v) for k, v in files.items()})
    spec.update({k: os.path.relpath(Path(v).resolve(), folder.resolve()) for k, v in where.items()})
    (folder / "minicosy.json").write_text(json.dumps(spec, indent=1))
    return folder
