"""The app's result area as an anywidget (JavaScript in ``player.js``): a status line that ticks
while a request runs and shows errors as errors, gapless live playback of streamed chunks (Web
Audio, each chunk scheduled right after the previous one), then one player of the whole utterance
to replay and download.

anywidget is used because playing chunks back to back needs a few lines of browser code: it runs
them from a string, with no JupyterLab extension to build, and works alike in JupyterLab, Notebook
7 and VS Code. ``IPython.display.Audio`` per chunk cannot schedule one chunk after another, and a
notebook's HTML/JavaScript outputs are sanitised or blocked in untrusted notebooks.
"""
from __future__ import annotations

import io
from pathlib import Path

import anywidget
import numpy as np
import traitlets


def audio_bytes(wav: np.ndarray, rate: int, format: str = "WAV") -> bytes:
    """A mono waveform in [-1, 1] as the bytes of a 16-bit WAV file (or an MP3, a tenth of the size)."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(np.asarray(wav, dtype=np.float32), -1.0, 1.0), rate, format=format,
             subtype="PCM_16" if format == "WAV" else None)
    return buf.getvalue()


class StreamPlayer(anywidget.AnyWidget):
    """Call :meth:`start` when a request starts, :meth:`play` for each chunk as it arrives, then
    :meth:`finish` with the whole utterance or :meth:`fail` with a one-line message."""

    _esm = Path(__file__).with_name("player.js")
    _css = """
    .minicosy-player .mc-status { margin: 4px 0; min-height: 1.4em; }
    .minicosy-player .mc-busy::before { content: ""; display: inline-block; width: 0.8em; height: 0.8em;
        margin-right: 0.4em; border: 2px solid currentColor; border-right-color: transparent; border-radius: 50%;
        vertical-align: -0.1em; animation: minicosy-spin 1s linear infinite; }
    @keyframes minicosy-spin { to { transform: rotate(360deg); } }
    .minicosy-player .mc-error { color: var(--jp-error-color1, #d32f2f); background: var(--jp-error-color3, #fde7e9);
                                 border-left: 3px solid var(--jp-error-color1, #d32f2f); padding: 2px 6px; }
    .minicosy-player .mc-whole audio { vertical-align: middle; height: 32px; }
    """
    busy = traitlets.Bool(False).tag(sync=True)
    progress = traitlets.Unicode("").tag(sync=True)
    error = traitlets.Unicode("").tag(sync=True)
    wav = traitlets.Bytes(b"").tag(sync=True)
    filename = traitlets.Unicode("minicosy.wav").tag(sync=True)

    def start(self, progress: str = "starting") -> None:
        """Forget the previous result (stopping its playback) and show the busy state."""
        self.send({"type": "reset"})
        with self.hold_sync():             # one message: the page never shows half a state
            self.wav, self.error, self.progress, self.busy = b"", "", progress, True

    def play(self, chunk: np.ndarray, rate: int) -> None:
        """Queue a chunk (mono float samples) right after the previous one."""
        self.send({"type": "chunk", "rate": int(rate)}, [np.ascontiguousarray(chunk, dtype=np.float32).tobytes()])

    def finish(self, wav: np.ndarray, rate: int, summary: str) -> None:
        """The whole utterance, to replay and download, and a summary line."""
        with self.hold_sync():
            self.wav, self.progress, self.busy = audio_bytes(wav, rate), summary, False

    def fail(self, message: str) -> None:
        """End the request with a one-line error."""
        with self.hold_sync():
            self.progress, self.error, self.busy = "", message.splitlines()[0] if message else "failed", False
