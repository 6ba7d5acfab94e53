"""An ipywidgets app for interactive synthesis (notebook 10): text, prompt (corpus voices, the real
prompts in ``../shared/data`` when present, or an upload), mode (zero-shot / cross-lingual /
instruct / SFT), streaming with chunks played as they arrive, and a latency chart.

The callbacks are plain functions (:func:`prompt_choices`, :func:`read_upload`, :func:`synthesize`,
:func:`latency_figure`) so that tests can call them without a browser; :func:`app` only wires them
to widgets.

Usage (in Jupyter)::

    from minicosy.widgets import app
    app(CosyVoice2.from_pretrained("tiny"))
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Callable

import matplotlib.pyplot as plt
import numpy as np

from .data import load_manifest
from .pipeline import join_speech

MODES = ("zero-shot", "cross-lingual", "instruct", "SFT")
SHARED_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts"


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


def read_upload(content: bytes) -> tuple[np.ndarray, int]:
    """An uploaded audio file's bytes -> (mono float32 waveform, rate); ``ValueError`` if unreadable."""
    import soundfile as sf

    try:
        wav, sr = sf.read(io.BytesIO(bytes(content)), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile's errors differ by format
        raise ValueError(f"cannot read the uploaded file as audio: {exc}") from exc
    return wav.mean(axis=1), int(sr)


def synthesize(tts, text: str, mode: str, prompt: dict | tuple | None = None, instruct: str = "",
               spk_id: str = "", stream: bool = False, seed: int = 0, incremental: bool = False,
               on_chunk: Callable[[dict], None] | None = None) -> list[dict]:
    """Run one request in ``mode`` (one of :data:`MODES`); ``prompt`` is a :func:`prompt_choices`
    entry or a (waveform, rate) upload with an optional transcript as its third item. Each output
    dict is passed to ``on_chunk`` as soon as it exists (streaming playback), then all are returned."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    common = {"stream": stream, "seed": seed, "incremental": incremental}
    if mode == "SFT":
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


def latency_figure(outputs: list[dict]) -> plt.Figure:
    """Horizontal stacked bars per chunk: when each stage ran (LM, flow, vocoder) and when the chunk
    was ready, against the audio it carries; the first-package latency is marked."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 0.5 + 0.45 * len(outputs) + 1.2), width_ratios=[3, 1])
    colors = {"frontend_s": "#c4b5fd", "lm_s": "#fcd34d", "flow_s": "#86efac", "vocoder_s": "#fca5a5"}
    prev_end = 0.0
    for i, o in enumerate(outputs):
        t = o["timings"]
        left = prev_end
        for stage, color in colors.items():
            ax.barh(i, t[stage], left=left, color=color, label=stage[:-2] if i == 0 else None)
            left += t[stage]
        prev_end = t["end_s"]
        bx.barh(i, t["audio_s"], color="#93c5fd")
    first = outputs[0]["totals"]["first_package_s"]
    ax.axvline(first, color="k", ls="--", lw=1)
    ax.text(first, -0.6, f" first package {first:.2f} s", fontsize=8, va="bottom")
    ax.set_xlabel("seconds since the request")
    ax.set_ylabel("chunk")
    ax.invert_yaxis()
    ax.legend(fontsize=8, loc="lower right")
    bx.set_xlabel("audio seconds delivered")
    bx.invert_yaxis()
    bx.set_yticks([])
    fig.tight_layout()
    return fig


def app(tts, corpus_root: str | Path = "data/corpus"):
    """The interactive synthesis app (a VBox); chunks play as they arrive when streaming. The box
    keeps the latest request's outputs in ``last_outputs`` and any error message in ``last_error``."""
    import ipywidgets as w
    from IPython.display import Audio, display

    choices = prompt_choices(corpus_root)
    text = w.Textarea(value="The weather is nice today, so we walk to the park.", layout=w.Layout(width="95%"))
    voice = w.Dropdown(options=list(choices) + ["(uploaded file)"], description="prompt")
    upload = w.FileUpload(accept="audio/*", multiple=False, description="upload")
    upload_text = w.Text(description="its text", placeholder="transcript of the upload (zero-shot)")
    mode = w.ToggleButtons(options=list(MODES), value="zero-shot")
    instruct = w.Text(value="Please speak very fast.", description="instruct")
    spk = w.Dropdown(options=tts.list_available_spks(), description="speaker")
    stream = w.Checkbox(value=True, description="streaming")
    incremental = w.Checkbox(value=False, description="incremental flow")
    seed = w.IntText(value=0, description="seed")
    go = w.Button(description="Synthesise", button_style="primary")
    out = w.Output()
    box = w.VBox([text, w.HBox([voice, upload, upload_text]), mode, w.HBox([instruct, spk]),
                  w.HBox([stream, incremental, seed, go]), out])
    box.last_outputs, box.last_error = [], None   # the latest request, for inspection (and tests)

    def run(_) -> None:
        out.clear_output()
        with out:
            try:
                if voice.value == "(uploaded file)":
                    if not upload.value:
                        raise ValueError("upload an audio file first")
                    wav, sr = read_upload(upload.value[0]["content"])
                    prompt = (wav, sr, upload_text.value)
                else:
                    prompt = choices[voice.value]
                outputs = synthesize(tts, text.value, mode.value, prompt, instruct.value, spk.value or "",
                                     stream.value, seed.value, incremental.value,
                                     on_chunk=lambda o: display(Audio(o["tts_speech"][0].numpy(), rate=tts.sample_rate,
                                                                      autoplay=stream.value)))
                box.last_outputs, box.last_error = outputs, None
                whole = join_speech(outputs)[0].numpy()
                print("whole utterance:")
                display(Audio(whole, rate=tts.sample_rate))
                display(latency_figure(outputs))
                plt.close("all")
            except (ValueError, FileNotFoundError) as exc:
                box.last_error = str(exc)
                print(f"error: {exc}")

    go.on_click(run)
    return box
