"""Front-end feature speed: minicosy's extractors against reference implementations, side by side
in one run on the same 5 s of audio (ratios > 1 mean minicosy is slower).

    python benchmarks/features.py

References: librosa's own mel / log-mel pipelines (numpy), and kaldi-native-fbank when installed.
The official code's times on this machine kind are in ../shared/reference/timings_cpu_fullsize.json
(matcha mel 4.6 ms, Whisper log-mel 2.0 ms, Kaldi fbank 3.0 ms for 5 s; not from this run).
"""
from __future__ import annotations

import statistics
import time

import librosa
import numpy as np
import torch

from minicosy.audio import kaldi_fbank, mel_spectrogram, whisper_log_mel


def median_ms(fn, repeats: int = 30) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    wav24 = (0.1 * rng.standard_normal(24000 * 5)).astype(np.float32)
    wav16 = (0.1 * rng.standard_normal(16000 * 5)).astype(np.float32)
    t24, t16 = torch.from_numpy(wav24), torch.from_numpy(wav16)
    rows = [("flow mel 80 @ 24 kHz", lambda: mel_spectrogram(t24),
             lambda: np.log(np.maximum(librosa.feature.melspectrogram(
                 y=wav24, sr=24000, n_fft=1920, hop_length=480, n_mels=80, fmax=8000, power=1.0), 1e-5)),
             "librosa"),
            ("Whisper log-mel 128 @ 16 kHz", lambda: whisper_log_mel(t16),
             lambda: np.log10(np.maximum(librosa.feature.melspectrogram(
                 y=wav16, sr=16000, n_fft=400, hop_length=160, n_mels=128), 1e-10)), "librosa")]
    try:
        import kaldi_native_fbank as knf

        def knf_fbank():
            opts = knf.FbankOptions()
            opts.frame_opts.dither = 0
            opts.mel_opts.num_bins = 80
            fb = knf.OnlineFbank(opts)
            fb.accept_waveform(16000, wav16.tolist())
            fb.input_finished()
            return np.stack([fb.get_frame(i) for i in range(fb.num_frames_ready)])

        rows.append(("Kaldi fbank 80 @ 16 kHz", lambda: kaldi_fbank(t16), knf_fbank, "kaldi-native-fbank"))
    except ImportError:
        print("kaldi-native-fbank not installed: fbank timed alone")
        print(f"{'Kaldi fbank 80 @ 16 kHz':32s} minicosy {median_ms(lambda: kaldi_fbank(t16)):7.2f} ms")
    print(f"{'feature (5 s of audio)':32s} {'minicosy':>10s} {'reference':>10s} {'ratio':>7s}  reference")
    for name, ours, ref, ref_name in rows:
        a, b = median_ms(ours), median_ms(ref)
        print(f"{name:32s} {a:8.2f} ms {b:8.2f} ms {a / b:7.2f}  {ref_name}")


if __name__ == "__main__":
    main()
