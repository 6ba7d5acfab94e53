"""The interactive app's callbacks, called as plain functions, and the app driven without a browser
(tests/test_browser.py drives it in JupyterLab)."""
import datetime
import io
from pathlib import Path
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pytest
import soundfile as sf

from minicosy.pipeline import TINY_MODELS, CosyVoice2
from minicosy.widgets import (MODES, UPLOADED, app, describe_latency, in_ui_words, latency_figure, latency_segments,
                              model_note, prompt_choices, read_upload, shown_controls, synthesize)

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
    assert all(Path(c["path"]).exists() for c in choices.values())


def test_read_upload_decodes_audio_bytes_and_names_a_file_that_is_not_audio():
    buf = io.BytesIO()
    sf.write(buf, np.stack([np.ones(100), np.zeros(100)], axis=1).astype(np.float32) * 0.5, 16000, format="WAV")
    wav, sr = read_upload(buf.getvalue())
    assert sr == 16000 and wav.shape == (100,) and np.allclose(wav, 0.25, atol=1e-4)
    with pytest.raises(ValueError, match=r"^notes\.txt is not an audio file") as err:
        read_upload(b"definitely not audio", "notes.txt")
    assert "BytesIO" not in str(err.value) and "0x" not in str(err.value)


def test_errors_use_the_apps_words_and_controls_follow_the_mode():
    assert in_ui_words("prompt_text is empty: zero-shot needs the transcript of the prompt audio\nmore") == \
        "the prompt transcript is empty: zero-shot needs the transcript of the prompt recording"
    assert in_ui_words("unknown zero-shot speaker 'x'") == "unknown zero-shot speaker 'x'"
    assert "the speaker" in in_ui_words("zero_shot_spk_id must be a non-empty string")
    assert shown_controls("zero-shot", True) == {"prompt", "transcript", "register", "incremental"}
    assert shown_controls("cross-lingual", False) == {"prompt", "speed"}
    assert shown_controls("instruct", True) == {"prompt", "instruction", "incremental"}
    assert shown_controls("SFT", False) == {"speaker", "speed"}


def _fake(end_s: float, sentence: int, first: float, lm: float = 0.2, flow: float = 0.3) -> dict:
    timings = {"frontend_s": 0.0, "lm_s": lm, "flow_s": flow, "vocoder_s": 0.1, "end_s": end_s, "audio_s": 1.0}
    return {"timings": timings, "sentence": sentence, "totals": {"first_package_s": first, "audio_s": 4.0}}


def test_latency_chart_is_on_the_requests_clock_with_unattributed_time_shown():
    outs = [_fake(1.0, 0, 1.0), _fake(2.0, 0, 1.0), _fake(3.5, 1, 1.0), _fake(4.0, 1, 1.0, lm=0.2, flow=0.1)]
    outs[0]["timings"]["frontend_s"] = 0.2
    rows = latency_segments(outs)
    for row, o, prev in zip(rows, outs, [0.0] + [o["timings"]["end_s"] for o in outs]):
        assert row[0][1] == pytest.approx(prev)                           # from the previous chunk's end ...
        assert row[-1][1] + row[-1][2] == pytest.approx(o["timings"]["end_s"])   # ... to this one's
        assert all(a[1] + a[2] == pytest.approx(b[1]) for a, b in zip(row, row[1:]))   # no gaps, no overlaps
    assert [s for s, _, _ in rows[0]] == ["other", "frontend_s", "lm_s", "flow_s", "vocoder_s"]
    assert rows[0][0][2] == pytest.approx(0.2) and rows[2][0][2] == pytest.approx(0.9)
    fig = latency_figure(outs)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "seconds since the request" and list(ax.get_yticks()) == [0, 1, 2, 3]
    first = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert len(first) == 1 and first[0].get_xdata()[0] == pytest.approx(1.0)   # the first package: chunk 0's end
    bars = [p for p in ax.patches if p.get_width() > 0]
    assert max(p.get_x() + p.get_width() for p in bars) == pytest.approx(4.0)
    assert any("sentence 2" in t.get_text() for t in ax.texts)
    assert describe_latency(outs) == ("latency chart: 4 chunks in 2 sentence(s), ready at 1.00, 2.00, 3.50, 4.00 s "
                                      "since the request; first package after 1.00 s")
    fig.canvas.draw()                          # the legend is below the axes, hiding no bar
    legend = fig.legends[0].get_window_extent()
    assert legend.y1 <= min(a.get_tightbbox().y0 for a in fig.axes) + 1
    plt.close(fig)


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
    slow = synthesize(tts, "We walk to the park today.", "zero-shot", (wav, sr, prompt["text"]), speed=0.5)
    assert slow[-1]["totals"]["audio_s"] == pytest.approx(2 * outs[-1]["totals"]["audio_s"], abs=0.05)
    with pytest.raises(ValueError, match="mode"):
        synthesize(tts, "Hi.", "karaoke", prompt)
    with pytest.raises(ValueError, match="prompt recording"):
        synthesize(tts, "Hi.", "zero-shot", None)
    with pytest.raises(ValueError, match="SFT needs a speaker"):
        synthesize(tts, "Hi.", "SFT", None, spk_id="")


def _run(ui) -> None:
    ui.synthesise()
    ui.wait(120)
    assert not ui.busy and not ui.go.disabled


def test_app_runs_requests_in_the_background_and_reports_in_its_words(tts, corpus_root):
    ui = app(tts, corpus_root)
    assert "run the notebook" in ui._repr_mimebundle_()["text/plain"]     # not a VBox(children=...) repr
    assert ui.transcript.value == ui.choices[ui.voice.value]["text"] and len(ui.preview.value) > 44
    ui.synthesise()                            # the default: zero-shot, streaming, the first held-out voice
    job = ui._job
    assert ui.go.disabled and ui.player.busy and ui.player.wav == b""   # busy at once, the old result gone
    ui.synthesise()                            # a second click while busy is ignored
    assert ui._job is job
    ui.wait(120)
    assert not ui.busy and not ui.go.disabled and not ui.player.busy
    assert ui.last_error is None and ui.last_outputs[-1]["totals"]["audio_s"] > 0
    assert ui.player.wav[:4] == b"RIFF" and ui.chart.value[:4] == b"\x89PNG" and ui.player.progress.startswith("✓")
    assert describe_latency(ui.last_outputs) in ui.chart_text.value
    ui.text.value = ""
    _run(ui)
    assert ui.last_error == "text is empty: nothing to synthesise" == ui.player.error and ui.player.wav == b""
    ui.text.value, ui.mode.value = "Hi.", "SFT"
    _run(ui)
    assert ui.last_error is None and ui.player.error == "" and ui.last_outputs
    ui.mode.value = "zero-shot"
    ui.transcript.value = ""                   # the transcript is the one in the box, edited
    _run(ui)
    assert ui.last_error.startswith("the prompt transcript is required") and ui.player.error == ui.last_error
    ui.voice.value = UPLOADED                  # nothing uploaded: a message, no exception
    _run(ui)
    assert "no prompt uploaded" in ui.last_error
    ui.upload.value = ({"name": "notes.txt", "type": "text/plain", "size": 5, "content": memoryview(b"hello"),
                        "last_modified": datetime.datetime(2026, 1, 1)},)
    assert "notes.txt is not an audio file" in ui.upload_info.value
    _run(ui)
    assert ui.last_error.startswith("notes.txt is not an audio file")


def test_app_registers_a_speaker_that_sft_then_lists(tts, corpus_root):
    ui = app(tts, corpus_root)
    ui.spk_name.value = "new-voice"
    assert "new-voice" not in ui.speaker.options
    ui.register.click()
    assert "registered" in ui.register_info.value
    for mode in MODES:                         # only the controls of the mode show; the text always does
        ui.mode.value = mode
        shown = {name for name, row in ui.rows.items() if row.layout.display != "none"}
        assert shown == shown_controls(mode, ui.stream.value) and ui.text.layout.display != "none"
    assert "new-voice" in ui.speaker.options and ui.rows["prompt"].layout.display == "none"
    ui.mode.value, ui.spk_name.value = "zero-shot", ""
    ui.register.click()
    assert "type a speaker name" in ui.register_info.value


def test_the_app_says_what_to_expect_from_the_model_it_runs(tmp_path):
    notes = {name: model_note(SimpleNamespace(model_dir=folder)) for name, folder in TINY_MODELS.items()}
    assert len(set(notes.values())) == len(notes)                  # each shipped model has its own note
    assert all(n.startswith("<b>What to expect from the tiny model.</b>") for n in notes.values())
    assert "does not speak intelligibly" in notes["tiny"] and "intelligible" in notes["tiny-phone"]
    (tmp_path / "cosyvoice2.yaml").write_text("")
    assert "CosyVoice2-0.5B" in model_note(SimpleNamespace(model_dir=tmp_path))
    assert "no checkpoint folder" in model_note(SimpleNamespace(model_dir=None))
