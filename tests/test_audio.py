"""Audio I/O and the three front-end features at official parity (golden/frontend_fixtures.pt)."""
import numpy as np
import pytest
import soundfile as sf
import torch

from minicosy.audio import (kaldi_fbank, load_wav, mel_spectrogram, normalize_peak, resample, resample_sinc,
                            trim_silence, whisper_log_mel)

from .conftest import SHARED_DATA, need, torchaudio_or_skip


def test_flow_mel_matches_official(frontend_fixtures):
    ours = mel_spectrogram(frontend_fixtures["wav24k"])
    ref = frontend_fixtures["matcha_mel_24k_fmax8000"]
    assert ours.shape == ref.shape == (1, 80, 50)          # 50 frames per second at 24 kHz
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mel_spectrogram(frontend_fixtures["wav24k"][0]), ref[0], atol=1e-5, rtol=1e-5)


def test_whisper_log_mel_matches_official(frontend_fixtures):
    ours = whisper_log_mel(frontend_fixtures["wav16k"])
    ref = frontend_fixtures["whisper_log_mel_128"]
    assert ours.shape == ref.shape == (1, 128, 100)        # 100 frames per second at 16 kHz
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mean_norm,key", [(False, "kaldi_fbank80_raw"), (True, "kaldi_fbank80_meannorm")])
def test_kaldi_fbank_matches_official(frontend_fixtures, mean_norm, key):
    ours = kaldi_fbank(frontend_fixtures["wav16k"][0], mean_norm=mean_norm)
    ref = frontend_fixtures[key]
    assert ours.shape == ref.shape == (98, 80)             # snip-edges: 1 + (16000 - 400) // 160
    err = (ours - ref).abs().max().item()
    print(f"kaldi fbank ({key}) max abs error {err:.2e}")
    # bit-exact on the machine kind where the fixtures were checked (mel banks built in float32 as
    # torchaudio builds them); 1.1e-4 (relative 7.5e-6, in 2 % of the bins) on an AMD EPYC of the
    # same kind, whose FFT sums in another order: room for that, in log-energy units
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-5)
    if mean_norm:
        assert ours.mean(dim=0).abs().max() < 1e-5


def test_kaldi_fbank_float64_differs_only_in_rounding(frontend_fixtures):
    wav = frontend_fixtures["wav16k"][0]
    f32, f64 = kaldi_fbank(wav, mean_norm=False), kaldi_fbank(wav, mean_norm=False, dtype=torch.float64)
    assert (f32 - f64).abs().max() < 2e-3
    assert (f32 - f64).abs().median() < 1e-5


def test_feature_shapes_follow_rates():
    wav24, wav16 = torch.randn(24000 * 2), torch.randn(16000 * 2)
    assert mel_spectrogram(wav24).shape == (80, 100)
    assert mel_spectrogram(torch.stack([wav24, wav24])).shape == (2, 80, 100)
    assert whisper_log_mel(wav16).shape == (128, 200)
    assert kaldi_fbank(wav16).shape == (198, 80)
    with pytest.raises(ValueError, match="too short"):
        kaldi_fbank(torch.zeros(100))
    with pytest.raises(ValueError, match="shape"):
        mel_spectrogram(torch.zeros(1, 1, 100))


def test_load_wav_downmixes_and_resamples(tmp_path):
    t = np.arange(8000) / 8000
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 440 * t)], axis=1) * 0.5
    path = tmp_path / "stereo.flac"
    sf.write(path, stereo, 8000)
    wav, sr = load_wav(path, 24000)
    assert sr == 24000 and wav.dtype == np.float32 and wav.ndim == 1
    assert abs(len(wav) - 24000) <= 1
    assert abs(np.abs(wav).max() - 0.375) < 0.01             # mean of the two channels
    wav, _ = load_wav(path, normalize=True)
    assert abs(np.abs(wav).max() - 0.95) < 1e-5


def test_resample_keeps_a_tone():
    t = np.arange(16000) / 16000
    y = resample(np.sin(2 * np.pi * 1000 * t).astype(np.float32), 16000, 24000)
    spectrum = np.abs(np.fft.rfft(y))
    assert len(y) == 24000 and abs(np.argmax(spectrum) - 1000) <= 1


def test_bad_audio_gets_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_wav(tmp_path / "missing.wav")
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"this is not audio")
    with pytest.raises(ValueError, match="cannot read"):
        load_wav(junk)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0), 16000)
    with pytest.raises(ValueError, match="no samples"):
        load_wav(empty)
    with pytest.raises(ValueError, match="silent"):
        normalize_peak(np.zeros(1000, dtype=np.float32))


def test_trim_silence_cuts_leading_and_trailing_silence():
    sr = 24000
    tone = 0.5 * np.sin(2 * np.pi * 200 * np.arange(sr) / sr)
    wav = np.concatenate([np.zeros(sr), tone, np.zeros(sr)]).astype(np.float32)
    trimmed = trim_silence(wav, sr)
    assert 1.0 <= len(trimmed) / sr < 1.2


def _recordings() -> list[tuple[np.ndarray, int]]:
    """Real speech at 22.05 kHz (LJSpeech), 24 kHz (a prompt), 16 kHz (LibriSpeech), 8 kHz (FSDD)."""
    data = need(SHARED_DATA, "shared recordings")
    return [load_wav(data / rel) for rel in ("ljspeech_lj001/LJ001-0003.flac", "prompts/en_f5tts_basic_ref_en.flac",
                                             "librispeech_test-other/1688/1688-142285-0000.flac", "fsdd/3_theo_7.flac")]


def test_sinc_resampler_is_torchaudios():
    """The official front end's resampler (torchaudio.transforms.Resample, default parameters),
    bit for bit, at every rate pair a prompt may come in."""
    transforms = torchaudio_or_skip().transforms
    for wav, sr in _recordings():
        for target in {16000, 24000} - {sr}:
            ours = resample_sinc(wav, sr, target)
            ref = transforms.Resample(sr, target)(torch.from_numpy(wav)[None])[0].numpy()
            assert ours.shape == ref.shape == (-(-len(wav) * target // sr),), (sr, target)
            assert np.array_equal(ours, ref), (sr, target, np.abs(ours - ref).max())
            assert np.array_equal(resample(wav, sr, target, "sinc"), ours)


def test_sinc_resampler_keeps_a_tone_and_refuses_unknown_methods():
    t = np.arange(22050) / 22050
    y = resample_sinc(np.sin(2 * np.pi * 1000 * t).astype(np.float32), 22050, 16000)
    assert len(y) == 16000
    spectrum = np.abs(np.fft.rfft(y[2000:14000] * np.hanning(12000)))
    assert abs(np.argmax(spectrum) * 16000 / 12000 - 1000) < 2
    assert abs(np.abs(y[2000:14000]).max() - 1.0) < 0.01
    with pytest.raises(ValueError, match="resampling method"):
        resample(y, 16000, 24000, "linear")


def test_kaldi_fbank_is_torchaudios_on_real_speech():
    kaldi = torchaudio_or_skip().compliance.kaldi
    for wav, sr in _recordings():
        wav16 = resample(wav, sr, 16000)[:16000 * 4]
        ref = kaldi.fbank(torch.from_numpy(wav16)[None], num_mel_bins=80, dither=0, sample_frequency=16000)
        torch.testing.assert_close(kaldi_fbank(wav16, mean_norm=False), ref, atol=1e-6, rtol=2.4e-7)
