"""Property-based tests (hypothesis) of what bad input gets: random text, prompt arrays, request
options and corrupted model folders, through the public API and the loaders. Every case ends in a
result that is real audio or in a documented exception that names its argument or file, within a
bounded time: never an empty, silent or non-finite result, never a deep trace or a hang."""
import shutil
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minicosy.frontend import read_prompt_audio
from minicosy.pipeline import TINY_DIR, CosyVoice2, check_request, join_speech
from minicosy.text_tokenizer import COSYVOICE_SPECIAL_TOKENS

pytestmark = pytest.mark.usefixtures("single_thread")
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SLOW = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tts() -> CosyVoice2:
    return CosyVoice2.from_pretrained("tiny")


@pytest.fixture(scope="module")
def voice(corpus_root):
    from minicosy.audio import load_wav
    from minicosy.data import load_manifest

    rec = next(r for r in load_manifest(corpus_root, "heldout") if r["lang"] == "en" and 3 < r["duration"] < 5)
    return load_wav(corpus_root / rec["path"])


words = st.sampled_from(["hello", "the", "train", "3", "42.5", "ok", "我们", "ありがとう", "감사", "x"])
texts = st.one_of(
    st.text(max_size=40),
    st.lists(st.one_of(words, st.sampled_from(COSYVOICE_SPECIAL_TOKENS + ["<|endofprompt|>", "...", "?!", " "])),
             max_size=8).map(" ".join))


@FAST
@given(text=texts)
def test_any_text_is_split_or_refused_by_name(tts, text):
    try:
        sentences = tts.frontend.sentences(text)
    except ValueError as e:
        assert "text" in str(e)
        return
    assert sentences and all(isinstance(s, str) and s.strip() for s in sentences)


@SLOW
@given(text=texts, seed=st.integers(0, 2**31 - 1))
def test_any_text_gives_real_audio_or_a_named_error(tts, voice, text, seed):
    start = time.perf_counter()
    try:
        out = list(tts.inference_cross_lingual(text, voice, seed=seed))
    except ValueError as e:
        assert "text" in str(e) or "sentence" in str(e)
        return
    speech = join_speech(out)
    assert speech.shape[1] > 0 and torch.isfinite(speech).all() and speech.abs().max() > 1e-3
    assert time.perf_counter() - start < 120                       # bounded: long text is cut, never hangs


arrays = st.tuples(st.sampled_from(["float32", "float64", "int16", "int32", "uint8", "bool", "complex64"]),
                   st.sampled_from([(24000,), (2, 24000), (24000, 2), (2, 2, 6000), (100,), (0,)]),
                   st.sampled_from([1.0, 1000.0, 1e-6, 0.0]))
rates = st.one_of(st.sampled_from([16000, 22050.0, 24000, 8, -1, float("nan"), True]), st.text(max_size=3))


@FAST
@given(spec=arrays, rate=rates, seed=st.integers(0, 1000))
def test_any_prompt_array_is_audio_or_refused_by_name(spec, rate, seed):
    dtype, shape, scale = spec
    noise = np.random.default_rng(seed).standard_normal(shape) * 0.3 * scale
    wav = noise.astype(dtype) if dtype not in ("int16", "int32", "uint8") else \
        np.clip(noise * 1000, -100, 100).astype(dtype)
    try:
        audio, sr = read_prompt_audio((wav, rate))
    except ValueError as e:
        assert "prompt audio" in str(e)
        return
    assert audio.dtype == np.float32 and audio.ndim == 1 and isinstance(sr, int) and sr >= 1000
    assert np.isfinite(audio).all() and 1e-3 <= np.abs(audio).max() <= 2.0 and audio.size / sr >= 1.0


@FAST
@given(speed=st.one_of(st.floats(allow_nan=True), st.integers(-5, 5), st.text(max_size=2), st.booleans()),
       seed=st.one_of(st.none(), st.integers(), st.floats(), st.booleans(), st.just(np.int64(7))),
       stream=st.sampled_from([True, False, 1, "yes", np.bool_(True)]))
def test_request_options_are_checked_by_name(speed, seed, stream):
    try:
        checked = check_request(speed, seed, stream, False)
    except ValueError as e:
        assert any(name in str(e) for name in ("speed", "seed", "stream"))
        return
    assert 0.5 <= speed <= 2.0 and (checked is None or isinstance(checked, int))


CORRUPTIONS = ("delete", "empty", "truncate", "garbage", "not json")


@pytest.fixture(scope="module")
def folder_copy(tmp_path_factory):
    return shutil.copytree(TINY_DIR, tmp_path_factory.mktemp("tiny") / "model")


@SLOW
@given(name=st.sampled_from(["minicosy.json", "lm_tiny.pt", "flow_tiny.pt", "hift_tiny.pt", "campplus_tiny.pt",
                             "speech_tokenizer_fsq.pt", "spk2info_tiny.pt"]), how=st.sampled_from(CORRUPTIONS))
def test_a_corrupted_folder_names_the_file(folder_copy, tmp_path_factory, name, how):
    folder = shutil.copytree(folder_copy, tmp_path_factory.mktemp("corrupt") / "model")
    path = folder / name
    data = path.read_bytes()
    if how == "delete":
        path.unlink()
    else:
        path.write_bytes({"empty": b"", "truncate": data[:len(data) // 3], "garbage": bytes(range(256)) * 4,
                          "not json": b"{oops"}[how])
    start = time.perf_counter()
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        CosyVoice2.from_pretrained(folder)
    assert name in str(error.value) or (name == "minicosy.json" and "minicosy.json" in str(error.value))
    assert "Traceback" not in str(error.value) and time.perf_counter() - start < 30
