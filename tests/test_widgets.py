"""The interactive app's callbacks, called as plain functions (no browser)."""
import io

import matplotlib.pyplot as plt
import numpy as np
import pytest
import soundfile as sf

from minicosy.pipeline import CosyVoice2
from minicosy.widgets import MODES, app, latency_figure, prompt_choices, read_upload, synthesize

from .conftest import SHARED_DATA

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tts() -> CosyVoice2:
    return CosyVoice2.from_pretrained("tiny")


@pytest.fixture(scope="module")
def choices(corpus_root) -> dict:
    return prompt_choices(corpus_root)


def test_prompt_choices_list_held_out_voices_first_and_real_prompts(choices):
    labels = list(choices)
    assert "held-out voice" in labels[0]
    assert sum("held-out voice" in k for k in labels) == 3 and sum("training voice" in k for k in labels) == 13
    if (SHARED_DATA / "prompts" / "prompts.tsv").exists():
        real = [k for k in labels if choices[k]["source"] == "real"]
        assert len(real) == 4 and all(choices[k]["text"] for k in real)
    assert all(__import__("pathlib").Path(c["path"]).exists() for c in choices.values())


def test_read_upload_decodes_audio_bytes_and_refuses_junk():
    buf = io.BytesIO()
    sf.write(buf, np.stack([np.ones(100), np.zeros(100)], axis=1).astype(np.float32) * 0.5, 16000, format="WAV")
    wav, sr = read_upload(buf.getvalue())
    assert sr == 16000 and wav.shape == (100,) and np.allclose(wav, 0.25, atol=1e-4)
    with pytest.raises(ValueError, match="cannot read"):
        read_upload(b"definitely not audio")


def test_synthesize_runs_every_mode_and_streams_chunks(tts, choices):
    prompt = next(c for k, c in choices.items() if "held-out" in k and ", en)" in k)
    tts.add_zero_shot_spk(prompt["text"], prompt["path"], "app-voice")
    for mode in MODES:
        seen = []
        outs = synthesize(tts, "We walk to the park today.", mode, prompt, "Please speak slowly.", "app-voice",
                          stream=mode == "zero-shot", on_chunk=seen.append)
        assert seen == outs and all(o["tts_speech"].shape[0] == 1 for o in outs)
    wav, sr = sf.read(prompt["path"], dtype="float32")
    outs = synthesize(tts, "We walk to the park today.", "zero-shot", (wav, sr, prompt["text"]))
    assert outs[-1]["totals"]["audio_s"] > 0
    fig = latency_figure(outs)
    assert len(fig.axes) == 2 and fig.axes[0].get_xlabel() == "seconds since the request"
    plt.close(fig)
    with pytest.raises(ValueError, match="mode"):
        synthesize(tts, "Hi.", "karaoke", prompt)
    with pytest.raises(ValueError, match="prompt recording"):
        synthesize(tts, "Hi.", "zero-shot", None)


def test_app_builds_and_its_button_synthesises(tts, corpus_root):
    ui = app(tts, corpus_root)
    buttons = [c for box in ui.children if hasattr(box, "children") for c in box.children
               if type(c).__name__ == "Button"]
    assert len(buttons) == 1
    buttons[0].click()          # the default: zero-shot, streaming, the first held-out voice
    assert ui.last_error is None and len(ui.last_outputs) >= 1
    assert ui.last_outputs[-1]["totals"]["audio_s"] > 0
    ui.children[1].children[0].value = "(uploaded file)"   # nothing uploaded: a message, no exception
    buttons[0].click()
    assert "upload an audio file first" in ui.last_error
