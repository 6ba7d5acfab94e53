"""An ipywidgets app for interactive synthesis (notebook 10): a text; a prompt voice from the corpus
(the real prompts in ``../shared/data`` when present) or an upload, to hear and with an editable
transcript; the mode (zero-shot / cross-lingual / instruct / SFT, each explained, showing only the
controls it uses); streaming played as one continuous sound as chunks arrive, the whole utterance to
replay and download, and a latency chart on the request's clock.

The callbacks are plain functions (:func:`prompt_choices`, :func:`read_upload`, :func:`synthesize`,
:func:`latency_segments`, :func:`latency_figure`, :func:`describe_latency`, :func:`shown_controls`,
:func:`in_ui_words`) so that
tests can call them without a browser; :class:`SynthesisApp` wires them to widgets, and
``tests/test_browser.py`` uses it in JupyterLab.

Usage (in Jupyter)::

    from minicosy.widgets import app
    app(CosyVoice2.from_pretrained("tiny-phone"))
"""
from __future__ import annotations

import csv
import io
import re
import secrets
import sys
import threading
import traceback
from pathlib import Path
from typing import Callable

import ipywidgets as w
import matplotlib.pyplot as plt
import numpy as np

from .audio import load_wav
from .data import load_manifest
from .pipeline import SPEED_RANGE, TINY_MODELS, join_speech
from .player import StreamPlayer, audio_bytes

MODES = ("zero-shot", "cross-lingual", "instruct", "SFT")
MODE_HELP = {
    "zero-shot": "Continues the prompt (§2.3): the LM reads the prompt's <b>transcript</b> and speech tokens, the "
                 "flow its mel and speaker vector. The transcript must match the recording.",
    "cross-lingual": "Only the prompt's voice: the LM gets no prompt, so the prompt's language and words do not "
                     "leak into the text; the flow keeps the timbre. For a text in another language than the prompt.",
    "instruct": "An <b>instruction</b> (speed, emotion, emphasis…) takes the place of the LM's prompt; the flow "
                "keeps the prompt's voice (§2.6).",
    "SFT": "A registered <b>speaker</b> by name (§2.7): the LM gets no prompt, the flow only the speaker's "
           "x-vector. The corpus' training voices are registered; register any prompt in zero-shot mode.",
}
CJK_FONT = ("Chinese, Japanese and Korean text needs a CJK font (Debian: <code>fonts-noto-cjk</code>).")
MODEL_NOTES = {
    "tiny-phone": "<b>What to expect from the tiny model.</b> <code>tiny-phone</code> reads English through phones "
                  "and was trained on CPUs on the project's large synthetic English corpus (README, results): its "
                  "English is intelligible in the corpus' voices and in held-out ones, at lower quality than the "
                  "recordings. It was not trained on instructions (load <code>tiny-phone-instruct</code>, which "
                  "notebook 07 measures) and speaks only English.",
    "tiny-phone-instruct": "<b>What to expect from the tiny model.</b> <code>tiny-phone-instruct</code> is "
                           "<code>tiny-phone</code>'s LM trained further with the instruct sub-corpus: it follows "
                           "some instructions (notebook 07 measures which) and speaks only English.",
    "tiny": "<b>What to expect from the tiny model.</b> <code>tiny</code> reads BPE pieces, as the paper does, and "
            "was trained for minutes on the small synthetic corpus (English, Mandarin, Japanese, Korean voices): "
            "it makes speech-like sound in roughly the prompt's voice but does not speak intelligibly (README, "
            "results); <code>tiny-phone</code> does, in English. " + CJK_FONT,
}


def model_note(tts) -> str:
    """The app's first line: what to expect from the loaded model (one of :data:`~minicosy.pipeline.TINY_MODELS`,
    the official CosyVoice2-0.5B folder, or another minicosy folder)."""
    if tts.model_dir is None:
        return "<b>A CosyVoice 2 model</b> built in this session (no checkpoint folder)."
    folder = Path(tts.model_dir).resolve()
    name = next((k for k, v in TINY_MODELS.items() if Path(v).resolve() == folder), None)
    if name in MODEL_NOTES:
        return MODEL_NOTES[name]
    if (folder / "cosyvoice2.yaml").exists():
        return f"<b>CosyVoice2-0.5B</b> (official weights, <code>{folder.name}</code>). " + CJK_FONT
    return f"<b>A minicosy model</b> (<code>{folder.name}</code>): its card in the folder says how it was trained."


UPLOADED = "(uploaded file)"
SHARED_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts"
STAGES = {"frontend_s": ("front-end", "#c4b5fd"), "lm_s": ("LM", "#fcd34d"), "flow_s": ("flow", "#86efac"),
          "vocoder_s": ("vocoder", "#fca5a5"), "other": ("other (Python, the caller)", "#d1d5db")}
API_WORDS = {"zero_shot_spk_id": "speaker", "spk_id": "speaker", "prompt_text": "prompt transcript",
             "prompt_wav": "prompt recording", "prompt audio": "prompt recording", "instruct_text": "instruction",
             "tts_text": "text"}


def prompt_choices(corpus_root: str | Path = "data/corpus", shared_prompts: str | Path = SHARED_PROMPTS,
                   per_voice: int = 1) -> dict[str, dict]:
    """Label -> {"path", "text", "source"}: ``per_voice`` utterances (3-6 s) of every corpus voice,
    held-out voices first, then the real recordings listed in ``prompts.tsv`` when that folder exists."""
    choices: dict[str, dict] = {}
    root = Path(corpus_root)
    if (root / "manifest.jsonl").exists():
        records = sorted(load_manifest(root), key=lambda r: (r["split"] != "heldout", r["speaker"], r["id"]))
        taken: dict[str, int] = {}
        for r in records:
            if 3.0 <= r["duration"] <= 6.0 and taken.get(r["speaker"], 0) < per_voice:
                taken[r["speaker"]] = taken.get(r["speaker"], 0) + 1
                kind = "held-out voice" if r["split"] == "heldout" else "training voice"
                choices[f"{r['speaker']} ({kind}, {r['lang']})"] = {"path": str(root / r["path"]), "text": r["text"],
                                                                     "source": "corpus"}
    table = Path(shared_prompts) / "prompts.tsv"
    if table.exists():
        with open(table, encoding="utf-8") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                choices[f"{row['file']} (real, {row['lang']})"] = {"path": str(Path(shared_prompts) / row["file"]),
                                                                   "text": row["transcript"], "source": "real"}
    return choices


def read_upload(content: bytes, name: str = "the uploaded file") -> tuple[np.ndarray, int]:
    """An uploaded audio file's bytes -> (mono float32 waveform, rate); a ``ValueError`` naming the
    file if it is not audio."""
    import soundfile as sf

    try:
        wav, sr = sf.read(io.BytesIO(bytes(content)), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile's errors differ by format; their text names a BytesIO, not the file
        reason = str(exc).rsplit(": ", 1)[-1].strip() or type(exc).__name__
        raise ValueError(f"{name} is not an audio file (WAV, FLAC, OGG or MP3 can be read): {reason}") from None
    if wav.size == 0:
        raise ValueError(f"{name} contains no audio samples")
    return wav.mean(axis=1), int(sr)


def in_ui_words(message: str) -> str:
    """An error message's first line with the API's argument names replaced by the app's labels."""
    for api, ui in API_WORDS.items():
        message = re.sub(rf"\b(the )?{api}\b", f"the {ui}", message)
    return message.splitlines()[0] if message else message


def shown_controls(mode: str, stream: bool) -> set[str]:
    """The optional controls that apply to ``mode`` and to streaming (or offline) synthesis."""
    shown = {"zero-shot": {"prompt", "transcript", "register"}, "cross-lingual": {"prompt"},
             "instruct": {"prompt", "instruction"}, "SFT": {"speaker"}}[mode]
    return shown | {"incremental" if stream else "speed"}


def synthesize(tts, text: str, mode: str, prompt: dict | tuple | None = None, instruct: str = "",
               spk_id: str = "", stream: bool = False, seed: int = 0, incremental: bool = False,
               speed: float = 1.0, on_chunk: Callable[[dict], None] | None = None) -> list[dict]:
    """Run one request in ``mode`` (one of :data:`MODES`); ``prompt`` is a :func:`prompt_choices`
    entry or a (waveform, rate) upload with an optional transcript as its third item. Each output
    dict is passed to ``on_chunk`` as soon as it exists (streaming playback), then all are returned."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    common = {"stream": stream, "seed": seed, "incremental": incremental, "speed": speed}
    if mode == "SFT":
        if not spk_id:
            raise ValueError("SFT needs a speaker: pick one, or register a prompt as a speaker in zero-shot mode")
        gen = tts.inference_sft(text, spk_id, **common)
    else:
        if prompt is None:
            raise ValueError(f"{mode} needs a prompt recording: pick a voice or upload one")
        audio, prompt_text = ((prompt["path"], prompt.get("text", "")) if isinstance(prompt, dict)
                              else ((prompt[0], prompt[1]), prompt[2] if len(prompt) > 2 else ""))
        if mode == "zero-shot":
            gen = tts.inference_zero_shot(text, prompt_text, audio, **common)
        elif mode == "cross-lingual":
            gen = tts.inference_cross_lingual(text, audio, **common)
        else:
            gen = tts.inference_instruct2(text, instruct, audio, **common)
    outputs = []
    for out in gen:
        outputs.append(out)
        if on_chunk is not None:
            on_chunk(out)
    return outputs


def latency_segments(outputs: list[dict]) -> list[list[tuple[str, float, float]]]:
    """Per chunk, its (stage, start, seconds) segments on the request's clock, from the previous
    chunk's end to its own: first ``other``, the time no stage accounts for (Python between the
    stages, the caller handling the previous chunk), then front-end, LM, flow and vocoder, so that
    each chunk's last segment ends when the chunk was ready (``end_s``)."""
    rows, prev_end = [], 0.0
    for o in outputs:
        t = o["timings"]
        staged = [(stage, t[stage]) for stage in STAGES if stage != "other" and t[stage] > 0]
        start = t["end_s"] - sum(seconds for _, seconds in staged)
        left = min(prev_end, start)
        row = [("other", left, start - left)] if start > left else []
        for stage, seconds in staged:
            row.append((stage, start, seconds))
            start += seconds
        rows.append(row)
        prev_end = t["end_s"]
    return rows


def latency_figure(outputs: list[dict]) -> plt.Figure:
    """Per chunk (integer rows, sentences marked), horizontal bars of when each stage ran on the
    request's clock, ending when the chunk was ready, and the audio it carries; the first-package
    latency is the dashed line, at the end of chunk 0's bar. The legend sits below the axes."""
    n = len(outputs)
    height = 1.7 + 0.3 * n
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, height), width_ratios=[3, 1], sharey=True)
    drawn: dict[str, object] = {}
    for i, row in enumerate(latency_segments(outputs)):
        for stage, left, seconds in row:
            label, color = STAGES[stage]
            drawn[stage] = ax.barh(i, seconds, left=left, height=0.7, color=color, label=label)
        bx.barh(i, outputs[i]["timings"]["audio_s"], height=0.7, color="#93c5fd")
        if i and outputs[i].get("sentence", 0) != outputs[i - 1].get("sentence", 0):
            for a in (ax, bx):
                a.axhline(i - 0.5, color="0.4", lw=0.8, ls=":")
            ax.text(0, i - 0.45, f" sentence {outputs[i]['sentence'] + 1}", fontsize=7, va="top", color="0.3")
    first, last = outputs[0]["totals"]["first_package_s"], outputs[-1]["timings"]["end_s"]
    ax.axvline(first, color="k", ls="--", lw=1)
    ax.set_title(f"first package after {first:.2f} s (dashed line), last chunk after {last:.2f} s", fontsize=9)
    ax.set_xlabel("seconds since the request")
    ax.set_xlim(0, last * 1.02)
    ax.set_ylabel("chunk")
    ax.set_yticks(range(n))
    ax.set_ylim(n - 0.5, -0.5)
    bx.set_xlabel("seconds of audio in the chunk")
    bx.set_title(f"{outputs[-1]['totals']['audio_s']:.2f} s of audio in all", fontsize=9)
    order = [stage for stage in STAGES if stage in drawn]
    fig.tight_layout(rect=(0, 0.3 / height, 1, 1))      # room for the legend below the axes
    fig.legend([drawn[s] for s in order], [STAGES[s][0] for s in order], loc="lower center", ncol=len(order),
               fontsize=8, frameon=False)
    return fig


def describe_latency(outputs: list[dict]) -> str:
    """The latency chart in one line of text (shown under it): chunks, sentences, when each was ready."""
    ends = ", ".join(f"{o['timings']['end_s']:.2f}" for o in outputs)
    sentences = len({o.get("sentence", 0) for o in outputs})
    return (f"latency chart: {len(outputs)} chunks in {sentences} sentence(s), ready at {ends} s since the request; "
            f"first package after {outputs[0]['totals']['first_package_s']:.2f} s")


def figure_png(fig: plt.Figure) -> bytes:
    """A figure as PNG bytes, cropped to its contents (legend included), and closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


class SynthesisApp(w.VBox):
    """The app: pick a text, a mode and its inputs, press *Synthesise*. The request runs in a thread
    (the button is disabled and clicks are ignored until it ends; :meth:`wait` joins it) while the
    player shows progress and plays the chunks. ``last_outputs`` and ``last_error`` keep the latest
    request's outputs and message, for inspection and tests."""

    def __init__(self, tts, corpus_root: str | Path = "data/corpus") -> None:
        self.tts, self.choices = tts, prompt_choices(corpus_root)
        self.last_outputs: list[dict] = []
        self.last_error: str | None = None
        self._job: threading.Thread | None = None
        label = {"description_width": "9em"}
        self.text = w.Textarea(value="The weather is nice today, so we walk to the park.", description="text",
                               rows=3, style=label, layout=w.Layout(width="95%"))
        self.mode = w.ToggleButtons(options=list(MODES), value="zero-shot", description="mode", style=label)
        self.mode_help = w.HTML()
        self.voice = w.Dropdown(options=[*self.choices, UPLOADED], description="prompt voice", style=label,
                                layout=w.Layout(width="34em"))
        self.upload = w.FileUpload(accept="audio/*", multiple=False, description="upload a prompt",
                                   layout=w.Layout(width="auto"))
        self.upload_info = w.HTML()
        self.preview = w.Audio(format="mp3", autoplay=False, controls=True, layout=w.Layout(height="32px"))
        self.transcript = w.Textarea(description="prompt transcript", rows=2, style=label,
                                     layout=w.Layout(width="95%"),
                                     placeholder="what the prompt recording says (zero-shot needs it)")
        self.spk_name = w.Text(description="register it as", placeholder="a speaker name", style=label)
        self.register = w.Button(description="Register speaker", tooltip="keep this prompt as an SFT speaker",
                                 layout=w.Layout(width="auto"))
        self.register_info = w.HTML()
        self.instruction = w.Text(value="Please speak very fast.", description="instruction", style=label,
                                  layout=w.Layout(width="95%"))
        self.speaker = w.Dropdown(options=tts.list_available_spks(), description="speaker", style=label)
        self.stream = w.Checkbox(value=True, description="streaming: play while synthesising", indent=False)
        self.incremental = w.Checkbox(value=False, description="incremental flow (cache past chunks)", indent=False)
        self.speed = w.FloatSlider(value=1.0, min=SPEED_RANGE[0], max=SPEED_RANGE[1], step=0.1,
                                   description="speed (offline)", style=label)
        self.seed = w.IntText(value=0, description="random seed", style=label, layout=w.Layout(width="16em"))
        self.dice = w.Button(description="new seed", icon="random", tooltip="draw a random seed",
                             layout=w.Layout(width="auto"))
        self.go = w.Button(description="Synthesise", button_style="primary", icon="play")
        self.player = StreamPlayer()
        self.chart = w.Image(format="png", layout=w.Layout(display="none", max_width="100%"))
        self.chart_text = w.HTML()
        self.rows = {"prompt": w.VBox([w.HBox([self.voice, self.upload]), self.upload_info, self.preview]),
                     "transcript": self.transcript,
                     "register": w.HBox([self.spk_name, self.register, self.register_info]),
                     "instruction": self.instruction, "speaker": self.speaker, "speed": self.speed,
                     "incremental": self.incremental}
        super().__init__([w.HTML(model_note(tts)), self.text, self.mode, self.mode_help, *self.rows.values(),
                          w.HBox([self.stream, self.seed, self.dice]), self.go, self.player, self.chart,
                          self.chart_text])
        self.add_class("minicosy-app")
        for name in ("text", "mode", "voice", "upload", "upload_info", "stream", "go", "chart", "chart_text"):
            getattr(self, name).add_class(f"mc-{name.replace('_', '-')}")      # hooks for tests/test_browser.py
        self.voice.observe(lambda _: self._prompt_changed(), "value")
        self.upload.observe(lambda _: self._uploaded(), "value")
        self.mode.observe(lambda _: self._show(), "value")
        self.stream.observe(lambda _: self._show(), "value")
        self.dice.on_click(lambda _: setattr(self.seed, "value", secrets.randbelow(2**31)))
        self.register.on_click(lambda _: self._register())
        self.go.on_click(lambda _: self.synthesise())
        self._prompt_changed()
        self._show()

    def _repr_mimebundle_(self, **kwargs) -> dict:
        bundle = super()._repr_mimebundle_(**kwargs)      # where widgets cannot show (untrusted, a console):
        bundle["text/plain"] = "(minicosy's synthesis app: run the notebook's cells to use it)"
        return bundle

    @property
    def busy(self) -> bool:
        return self._job is not None and self._job.is_alive()

    def wait(self, timeout: float | None = None) -> None:
        """Until the running request (if any) has ended."""
        if self._job is not None:
            self._job.join(timeout)

    def _show(self) -> None:
        shown = shown_controls(self.mode.value, self.stream.value)
        for name, row in self.rows.items():
            row.layout.display = None if name in shown else "none"
        self.mode_help.value = f"<i>{MODE_HELP[self.mode.value]}</i>"
        if self.mode.value == "SFT":        # speakers registered since the app was built
            self.speaker.options = self.tts.list_available_spks()

    def _prompt_changed(self) -> None:
        self.preview.layout.display = "none"
        if self.voice.value == UPLOADED:
            self.transcript.value = ""
            self._uploaded()
            return
        choice = self.choices[self.voice.value]
        self.transcript.value = choice["text"]
        self._set_preview(*load_wav(choice["path"]))

    def _set_preview(self, wav: np.ndarray, rate: int) -> None:
        self.preview.value = audio_bytes(wav, rate, "MP3")      # small: a saved notebook keeps it
        self.preview.layout.display = None

    def _uploaded(self) -> None:
        if not self.upload.value:
            self.upload_info.value = ""
            return
        file = self.upload.value[0]
        if self.voice.value != UPLOADED:
            self.voice.value = UPLOADED       # calls back here
            return
        try:
            wav, rate = read_upload(file["content"], file["name"])
        except ValueError as exc:
            self.preview.layout.display = "none"
            self.upload_info.value = f"<span style='color: var(--jp-error-color1)'>⚠ {exc}</span>"
            return
        self.upload_info.value = f"uploaded <b>{file['name']}</b>: {len(wav) / rate:.1f} s at {rate} Hz"
        self._set_preview(wav, rate)

    def _prompt(self) -> dict | tuple:
        """The chosen prompt with the transcript as edited."""
        if self.voice.value != UPLOADED:
            return dict(self.choices[self.voice.value], text=self.transcript.value)
        if not self.upload.value:
            raise ValueError("no prompt uploaded: press 'upload a prompt', or pick a corpus voice")
        file = self.upload.value[0]
        return (*read_upload(file["content"], file["name"]), self.transcript.value)

    def _register(self) -> None:
        name = self.spk_name.value.strip()
        try:
            if not name:
                raise ValueError("type a speaker name to register the prompt under")
            prompt = self._prompt()
            audio = prompt["path"] if isinstance(prompt, dict) else (prompt[0], prompt[1])
            text = prompt["text"] if isinstance(prompt, dict) else prompt[2]
            self.tts.add_zero_shot_spk(text, audio, name)
        except (ValueError, FileNotFoundError) as exc:
            self.register_info.value = f"<span style='color: var(--jp-error-color1)'>⚠ {in_ui_words(str(exc))}</span>"
            return
        self.register_info.value = f"registered <b>{name}</b>: pick it in SFT mode"
        self.speaker.options = self.tts.list_available_spks()

    def synthesise(self) -> None:
        """Start a request from the controls' values (ignored while one runs); returns at once."""
        if self.busy:
            return
        self.go.disabled, self.go.description = True, "Synthesising…"
        self.chart.layout.display, self.chart_text.value = "none", ""
        self.last_outputs, self.last_error = [], None
        self.player.start()
        args = {"text": self.text.value, "mode": self.mode.value, "instruct": self.instruction.value,
                "spk_id": self.speaker.value or "", "stream": self.stream.value, "seed": self.seed.value,
                "incremental": self.incremental.value, "speed": 1.0 if self.stream.value else self.speed.value}
        self._job = threading.Thread(target=self._run, args=(args,), daemon=True)
        self._job.start()

    def _run(self, args: dict) -> None:
        rate = self.tts.sample_rate

        def on_chunk(out: dict) -> None:
            if args["stream"]:
                self.player.play(out["tts_speech"][0].numpy(), rate)
            tot = out["totals"]
            self.player.progress = f"synthesising: {tot['chunks']} chunk(s) done, {tot['audio_s']:.2f} s of audio"

        try:
            prompt = None if args["mode"] == "SFT" else self._prompt()
            outputs = synthesize(self.tts, prompt=prompt, on_chunk=on_chunk, **args)
            whole = join_speech(outputs)[0].numpy()
            if not args["stream"]:
                self.player.play(whole, rate)
            tot = outputs[-1]["totals"]
            self.chart.value = figure_png(latency_figure(outputs))
            self.chart.layout.display = None
            self.chart_text.value = f"<details><summary>the chart as text</summary>{describe_latency(outputs)}</details>"
            self.last_outputs = outputs
            self.player.finish(whole, rate, f"✓ {tot['audio_s']:.2f} s of audio in {tot['elapsed_s']:.1f} s "
                                            f"({tot['chunks']} chunk(s), "
                                            f"first sound after {tot['first_package_s']:.2f} s)")
        except (ValueError, FileNotFoundError) as exc:
            self.last_error = in_ui_words(str(exc))
            self.player.fail(self.last_error)
        except Exception as exc:  # a bug: one line here, the traceback in the kernel's log
            traceback.print_exc(file=sys.__stderr__)
            self.last_error = f"unexpected {type(exc).__name__}: {exc}"
            self.player.fail(self.last_error)
        finally:
            self.go.disabled, self.go.description = False, "Synthesise"


def app(tts, corpus_root: str | Path = "data/corpus") -> SynthesisApp:
    """The interactive synthesis app for ``tts`` (a :class:`~minicosy.pipeline.CosyVoice2`)."""
    return SynthesisApp(tts, corpus_root)
