"""The end-to-end CosyVoice2 API on the tiny checkpoints: official methods and modes, streaming
(HiFT cache, incremental flow), per-request isolation, bad input, official-folder round trip."""
import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from minicosy.audio import mel_spectrogram
from minicosy.data import load_manifest
from minicosy.frontend import Frontend
from minicosy.hift import VocoderStream
from minicosy.official import read_yaml, write_official_folder
from minicosy.pipeline import TINY_DIR, CosyVoice2, eq11_latency, join_speech

pytestmark = pytest.mark.usefixtures("single_thread")
TEXT = "The weather is nice today, so we walk to the park."


@pytest.fixture(scope="module")
def tts() -> CosyVoice2:
    return CosyVoice2.from_pretrained("tiny")


@pytest.fixture(scope="module")
def prompt(corpus_root) -> tuple[str, str]:
    rec = next(r for r in load_manifest(corpus_root, "heldout") if r["lang"] == "en" and 3 < r["duration"] < 6)
    return str(corpus_root / rec["path"]), rec["text"]


@pytest.fixture(scope="module")
def vowel() -> tuple[tuple[np.ndarray, int], str]:
    """A corpus-free prompt: 3 s of a modulated 140 Hz tone at 24 kHz, with a made-up transcript."""
    t = np.arange(24000 * 3) / 24000
    wav = 0.3 * np.sin(2 * np.pi * 140 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return (wav.astype(np.float32), 24000), "Hello there."


def _audio(outputs: list[dict]) -> torch.Tensor:
    return torch.cat([o["tts_speech"] for o in outputs], dim=1)


def test_every_mode_yields_24khz_speech_with_timings(tts, prompt):
    wav, text = prompt
    assert tts.sample_rate == 24000
    tts.add_zero_shot_spk(text, wav, "held")
    runs = {
        "zero_shot": tts.inference_zero_shot(TEXT, text, wav, seed=0),
        "cross_lingual": tts.inference_cross_lingual(TEXT, wav, seed=0),
        "instruct2": tts.inference_instruct2(TEXT, "Please speak very fast.", wav, seed=0),
        "sft": tts.inference_sft(TEXT, "held", seed=0),
        "registered": tts.inference_zero_shot(TEXT, "", None, zero_shot_spk_id="held", seed=0),
        "text_in_stream": tts.inference_zero_shot(iter(["The weather is nice ", "today."]), text, wav, seed=0, stream=True),
    }
    for mode, gen in runs.items():
        outs = list(gen)
        speech = _audio(outs)
        assert speech.dtype == torch.float32 and speech.dim() == 2 and speech.shape[0] == 1, mode
        assert speech.shape[1] > 0 and speech.abs().max() <= 1.0, mode
        totals = outs[-1]["totals"]
        assert set(outs[0]["timings"]) >= {"frontend_s", "lm_s", "flow_s", "vocoder_s", "tokens", "audio_s"}
        assert totals["audio_s"] == pytest.approx(speech.shape[1] / 24000)
        assert totals["tokens"] * 2 * 480 == speech.shape[1], mode        # 25 Hz tokens -> 24 kHz samples
        assert 0 < totals["first_package_s"] <= totals["elapsed_s"] and totals["rtf"] > 0
    assert "held" in tts.list_available_spks() and "flite_slt" in tts.list_available_spks()   # + training voices
    assert _audio(list(tts.inference_sft(TEXT, "flite_slt", seed=0))).shape[1] > 0
    # the registered prompt gives the same request as passing the prompt again
    again = _audio(list(tts.inference_zero_shot(TEXT, text, wav, seed=0)))
    assert torch.equal(again, _audio(list(tts.inference_zero_shot(TEXT, "", None, zero_shot_spk_id="held", seed=0))))
    eq11 = eq11_latency(totals, 25)
    assert eq11["L_TTS"] == pytest.approx(25 * (eq11["d_lm"] + eq11["d_fm"] + eq11["d_voc"]))


def test_long_text_is_split_and_speed_stretches_the_mel(tts, prompt):
    wav, text = prompt
    outs = list(tts.inference_cross_lingual("It is 5 o'clock. " * 25 + "We go home.", wav, seed=0))
    assert len({o["sentence"] for o in outs}) >= 2
    # one clock for the whole request: later sentences end later, and the totals add every sentence up
    ends = [o["timings"]["end_s"] for o in outs]
    assert all(a < b for a, b in zip(ends, ends[1:]))
    totals = outs[-1]["totals"]
    assert totals["tokens"] * 2 * 480 == _audio(outs).shape[1] and totals["chunks"] == len(outs)
    assert totals["first_package_s"] == ends[0] and totals["elapsed_s"] == ends[-1]
    normal = _audio(list(tts.inference_cross_lingual(TEXT, wav, seed=1)))
    fast = _audio(list(tts.inference_cross_lingual(TEXT, wav, seed=1, speed=2.0)))
    assert fast.shape[1] == normal.shape[1] // 2 // 480 * 480


def test_streaming_is_close_to_offline_and_chunks_follow_the_hop_schedule(tts, prompt):
    wav, text = prompt
    offline = _audio(list(tts.inference_zero_shot(TEXT * 3, text, wav, seed=3)))
    chunks = list(tts.inference_zero_shot(TEXT * 3, text, wav, seed=3, stream=True))
    stream = _audio(chunks)
    assert len(chunks) >= 2 and stream.shape == offline.shape      # same LM tokens, same length
    tokens = [c["timings"]["tokens"] for c in chunks]
    assert tokens[1:-1] == [50, 100, 100, 100, 100][:len(tokens) - 2]
    mel_off, mel_str = mel_spectrogram(offline[0]), mel_spectrogram(stream[0])
    diff = float((mel_off - mel_str).abs().mean())
    other = _audio(list(tts.inference_cross_lingual("Completely different words here.", wav, seed=3)))
    n = min(other.shape[1], offline.shape[1])
    baseline = float((mel_spectrogram(offline[0, :n]) - mel_spectrogram(other[0, :n])).abs().mean())
    print(f"streaming vs offline: mean |log-mel diff| {diff:.3f} (another sentence: {baseline:.3f})")
    assert 0 < diff < baseline


def test_incremental_streaming_gives_the_recompute_audio_on_chunk_masked_chunks(tts, prompt):
    wav, text = prompt
    recompute = list(tts.inference_zero_shot(TEXT * 2, text, wav, seed=4, stream=True))
    incremental = list(tts.inference_zero_shot(TEXT * 2, text, wav, seed=4, stream=True, incremental=True))
    assert [c["tts_speech"].shape for c in recompute] == [c["tts_speech"].shape for c in incremental]
    for a, b in zip(recompute[:-2], incremental[:-2]):   # the last two depend on the final flow call
        assert float((a["tts_speech"] - b["tts_speech"]).abs().max()) < 1e-3
    # a registered speaker's prompt chunks are computed once, at registration
    tts.add_zero_shot_spk(text, wav, "cached")
    for _ in range(2):     # the first request computes the prompt's flow state, the second reuses it
        warm = list(tts.inference_zero_shot(TEXT * 2, "", None, zero_shot_spk_id="cached", seed=4, stream=True,
                                            incremental=True))
        assert tts.spk2info["cached"]["flow_state"].frames > 0
        assert all(torch.allclose(a["tts_speech"], b["tts_speech"], atol=1e-4) for a, b in zip(warm, incremental))


def test_interleaved_requests_do_not_interfere(tts, prompt):
    wav, text = prompt
    texts = [TEXT, "Please close the door.", "Four apples and a pear.", TEXT + " Again."]
    requests = [tts.inference_zero_shot(t, text, wav, seed=10 + i, stream=True) for i, t in enumerate(texts)]
    interleaved = [[] for _ in texts]
    live = set(range(len(texts)))
    while live:
        for i in sorted(live):
            try:
                interleaved[i].append(next(requests[i])["tts_speech"])
            except StopIteration:
                live.discard(i)
    for i, t in enumerate(texts):
        sequential = _audio(list(tts.inference_zero_shot(t, text, wav, seed=10 + i, stream=True)))
        assert torch.equal(torch.cat(interleaved[i], dim=1), sequential), f"request {i}"


def test_vocoder_stream_cross_fades_and_emits_every_sample(tts):
    mel = torch.randn(1, 80, 120) * 0.5 - 5
    stream = VocoderStream(tts.hift, generator=torch.Generator().manual_seed(0))
    parts = [stream(mel[:, :, :50], False), stream(mel[:, :, 50:100], False), stream(mel[:, :, 100:], True)]
    assert [p.shape[1] for p in parts] == [50 * 480 - 3840, 50 * 480, 20 * 480 + 3840]
    assert stream.cache is None
    w = torch.hamming_window(7680, periodic=False, dtype=torch.float64).numpy()
    assert np.allclose(stream.window.numpy(), np.hamming(7680)) and np.allclose(w, np.hamming(7680))


@pytest.mark.parametrize("call, match", [
    (lambda t, w, x: t.inference_zero_shot("", x, w), "empty"),
    (lambda t, w, x: t.inference_zero_shot("...", x, w), "nothing to say"),
    (lambda t, w, x: t.inference_zero_shot(TEXT, "", w), "prompt_text"),
    (lambda t, w, x: t.inference_zero_shot(TEXT, x, None), "prompt_wav"),
    (lambda t, w, x: t.inference_zero_shot(TEXT, x, "no/such/file.wav"), "does not exist"),
    (lambda t, w, x: t.inference_zero_shot(TEXT, x, (np.zeros(48000, np.float32), 24000)), "silent"),
    (lambda t, w, x: t.inference_zero_shot(TEXT, x, (np.random.rand(12000).astype(np.float32), 24000)), "too short"),
    (lambda t, w, x: t.inference_zero_shot(TEXT, x, (np.random.rand(16000 * 31).astype(np.float32), 16000)), "too long"),
    (lambda t, w, x: t.inference_zero_shot(TEXT, x, w, stream=True, speed=1.5), "speed"),
    (lambda t, w, x: t.inference_zero_shot(TEXT, x, w, speed=100), "speed must be a number from 0.5 to 2.0"),
    (lambda t, w, x: t.inference_zero_shot(TEXT, x, w, speed=float("nan")), "speed must be"),
    (lambda t, w, x: t.inference_zero_shot(TEXT, x, w, speed="fast"), "speed must be"),
    (lambda t, w, x: t.inference_zero_shot(TEXT, x, w, seed=1.5), "seed must be an integer"),
    (lambda t, w, x: t.inference_zero_shot(TEXT, x, w, stream="yes"), "stream must be True or False"),
    (lambda t, w, x: t.inference_cross_lingual(TEXT, w, incremental=1), "incremental must be"),
    (lambda t, w, x: t.inference_instruct2(TEXT, "<|endofprompt|>", w), "instruct_text"),
    (lambda t, w, x: t.inference_sft(TEXT, "nobody"), "unknown speaker"),
    (lambda t, w, x: t.inference_sft(TEXT, ["hibari_heart"]), "unknown speaker"),
    (lambda t, w, x: t.inference_zero_shot(TEXT, x, w, zero_shot_spk_id=3), "zero_shot_spk_id must be a str"),
    (lambda t, w, x: t.inference_zero_shot(TEXT, x, None, zero_shot_spk_id="nobody"), "unknown zero-shot"),
    (lambda t, w, x: t.inference_zero_shot(42, x, w), "str"),
])
def test_bad_input_gets_a_clear_error(tts, prompt, call, match):
    wav, text = prompt
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        next(call(tts, wav, text))


def test_seed_of_any_integer_type(tts, prompt):
    wav, _ = prompt
    a = _audio(list(tts.inference_cross_lingual("Hello there.", wav, seed=np.int64(3))))
    assert torch.equal(a, _audio(list(tts.inference_cross_lingual("Hello there.", wav, seed=3))))


def test_unreadable_and_multichannel_prompts(tts, prompt, tmp_path):
    wav, text = prompt
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not really a wav")
    with pytest.raises(ValueError, match="cannot read"):
        next(tts.inference_cross_lingual(TEXT, str(bad)))
    audio, sr = sf.read(wav, dtype="float32")
    stereo = tmp_path / "stereo.wav"
    sf.write(stereo, np.stack([audio, audio], axis=1), sr)
    mono = _audio(list(tts.inference_cross_lingual(TEXT, wav, seed=0)))
    assert torch.allclose(_audio(list(tts.inference_cross_lingual(TEXT, str(stereo), seed=0))), mono, atol=1e-4)


def test_folder_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CosyVoice2.from_pretrained(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="cosyvoice2.yaml"):
        CosyVoice2.from_pretrained(tmp_path)
    (tmp_path / "cosyvoice2.yaml").write_text("sample_rate: 24000\n")
    with pytest.raises(FileNotFoundError, match="llm.pt"):
        CosyVoice2.from_pretrained(tmp_path)
    spec = json.loads((TINY_DIR / "minicosy.json").read_text())
    (tmp_path / "minicosy.json").write_text(json.dumps(dict(spec, flow="flow_missing.pt")))
    (tmp_path / "cosyvoice2.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="flow_missing.pt"):
        CosyVoice2.from_pretrained(tmp_path)


def test_official_folder_round_trip(tts, prompt, tmp_path):
    folder = write_official_folder(tts, tmp_path / "CosyVoice2-tiny", TINY_DIR / "text_tokenizer")
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(["CosyVoice-BlankEN", "campplus.onnx", "cosyvoice2.yaml", "flow.pt", "hift.pt", "llm.pt",
                            "speech_tokenizer_v2.onnx"])
    doc = read_yaml(folder / "cosyvoice2.yaml")          # read as data: the tags are never instantiated
    assert doc["flow"]["_tag"] == "new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec"
    assert doc["flow"]["decoder"]["estimator"]["static_chunk_size"] == 50
    back = CosyVoice2.from_pretrained(folder)
    for name in ("lm", "flow", "hift"):
        ours, theirs = getattr(tts, name).state_dict(), getattr(back, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert back.flow.cfg == tts.flow.cfg and back.hift.cfg == tts.hift.cfg
    wav, text = prompt
    # the folder reads prompts as the official front end does (torchaudio's resampler, unpadded log-mel)
    assert back.frontend.resampling == "sinc" and not back.frontend.speech_tokenizer.pad_to_tokens
    same_resampler = Frontend(tts.frontend.text_tokenizer, tts.frontend.speech_tokenizer, tts.frontend.speaker_model,
                              resampling="sinc")
    p_torch, p_onnx = same_resampler.prompt(wav, text), back.frontend.prompt(wav, text)
    assert (p_torch.speech_token == p_onnx.speech_token).float().mean() > 0.95
    assert torch.allclose(p_torch.embedding, p_onnx.embedding, atol=1e-4)
    assert p_torch.text_ids == p_onnx.text_ids
    # a broken weight file names the key
    state = torch.load(folder / "flow.pt", weights_only=True)
    state["encoder_proj.weight"] = state["encoder_proj.weight"][:, :3]
    torch.save(state, folder / "flow.pt")
    with pytest.raises(ValueError, match="encoder_proj.weight"):
        CosyVoice2.from_pretrained(folder)
    shutil.rmtree(folder / "CosyVoice-BlankEN")
    with pytest.raises(FileNotFoundError, match="CosyVoice-BlankEN"):
        CosyVoice2.from_pretrained(folder)


def test_half_precision_and_devices(prompt):
    wav, text = prompt
    half = CosyVoice2.from_pretrained("tiny", dtype=torch.bfloat16)
    assert next(half.lm.parameters()).dtype == torch.bfloat16 and next(half.flow.parameters()).dtype == torch.bfloat16
    assert next(half.hift.parameters()).dtype == torch.float32          # STFT/iSTFT stay float32
    for stream in (False, True):
        speech = _audio(list(half.inference_zero_shot(TEXT, text, wav, seed=0, stream=stream)))
        assert speech.dtype == torch.float32 and speech.shape[1] > 0 and torch.isfinite(speech).all()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            CosyVoice2.from_pretrained("tiny", device="cuda")


def test_static_cache_requests_give_the_same_speech(tts, vowel):
    wav, text = vowel
    for stream in (False, True):
        run = lambda static: _audio(list(tts.inference_zero_shot(TEXT, text, wav, seed=3, stream=stream,
                                                                 static_cache=static)))
        assert torch.equal(run(True), run(False))
    with pytest.raises(ValueError, match="static_cache must be"):
        next(tts.inference_cross_lingual(TEXT, wav, static_cache="yes"))
    with pytest.raises(ValueError, match="static_cache needs the whole text"):
        next(tts.inference_cross_lingual(iter([TEXT]), wav, static_cache=True))


def test_half_precision_vocoder_convolutions(vowel):
    wav, text = vowel
    halves = CosyVoice2.from_pretrained("tiny", hift_dtype="bf16")     # convolutions only
    assert halves.hift.conv_pre.bias.dtype == torch.bfloat16 and halves.hift.m_source.l_linear.weight.dtype == torch.float32
    assert halves.hift.stft_window.dtype == torch.float32
    speech = _audio(list(halves.inference_zero_shot(TEXT, text, wav, seed=0, stream=True)))
    assert speech.dtype == torch.float32 and speech.shape[1] > 0 and torch.isfinite(speech).all()
    with pytest.raises(ValueError, match="dtype must be"):
        CosyVoice2.from_pretrained("tiny", hift_dtype="int8")


def test_registered_speakers_survive_save_spkinfo(tts, prompt, tmp_path):
    wav, text = prompt
    tts.add_zero_shot_spk(text, wav, "saved")
    path = tts.save_spkinfo(tmp_path / "spk2info.pt")
    again = CosyVoice2(tts.frontend, tts.lm, tts.flow, tts.hift, tts.config, spk2info=torch.load(path, weights_only=True))
    assert set(again.list_available_spks()) == set(tts.list_available_spks())
    first = _audio(list(tts.inference_zero_shot(TEXT, "", None, zero_shot_spk_id="saved", seed=2)))
    assert torch.equal(first, _audio(list(again.inference_zero_shot(TEXT, "", None, zero_shot_spk_id="saved", seed=2))))


def test_non_finite_audio_is_never_returned(tts):
    """A NaN that reaches the models (here an x-vector put in the speaker table by hand, past the
    loaders' checks) stops the request with an error instead of yielding NaN audio."""
    tts.spk2info["broken"] = {"embedding": torch.full((1, tts.config.flow.spk_embed_dim), float("nan"))}
    try:
        with pytest.raises(RuntimeError, match="NaN/Inf audio"):
            list(tts.inference_sft(TEXT, "broken", seed=0))
    finally:
        del tts.spk2info["broken"]


def test_a_huge_word_is_cut_into_bounded_requests(tts, prompt, monkeypatch):
    """One 10,000-character "word" (or text with special tokens, which is not split into sentences)
    becomes LM requests of at most MAX_PIECE_IDS ids each, not one request of thousands."""
    from minicosy import pipeline

    wav, _ = prompt
    lengths = []
    real = tts.lm.inference

    def spy(text, *args, **kwargs):
        lengths.append(len(text))
        return real(text, *args, **{**kwargs, "max_token_text_ratio": 0.1})    # keep the test short

    monkeypatch.setattr(tts.lm, "inference", spy)
    next(tts.inference_cross_lingual("a" * 10_000, wav, seed=0))
    next(tts.inference_cross_lingual("<|endofprompt|>" + "b" * 5_000, wav, seed=0))
    assert lengths and max(lengths) <= pipeline.MAX_PIECE_IDS


def test_prompt_arrays_in_any_pcm_form(tts, prompt):
    """Integer PCM is scaled to [-1, 1]; any real sample rate is taken; what is not audio is refused."""
    from minicosy.frontend import read_prompt_audio

    wav, _ = prompt
    audio, sr = sf.read(wav, dtype="float32")
    pcm = (audio * 32767).astype(np.int16)
    as_int, rate = read_prompt_audio((pcm, sr))
    assert rate == sr and np.abs(as_int - audio).max() < 1e-4
    assert np.allclose(read_prompt_audio((audio, float(sr)))[0], audio)
    assert np.abs(read_prompt_audio((torch.from_numpy(pcm.astype(np.int32) << 16), sr))[0] - audio).max() < 1e-4
    for bad, match in [((audio > 0, sr), "float or integer PCM"), ((audio * 1000, sr), "within \\[-1, 1\\]"),
                       ((audio, float("nan")), "sample rate"), ((audio, 8), "sample rate"), ((audio, "fast"), "tuple")]:
        with pytest.raises(ValueError, match=match):
            read_prompt_audio(bad)


@pytest.mark.parametrize("text, match", [
    ("[laughter]", "nothing to say"), ("<|endofprompt|>", "nothing to say"), ("\ud800 hello", "not valid Unicode"),
    (b"hello", "decode it first"), ({"hello": 1}, "got dict"), (iter(["", "  "]), "nothing to say"),
])
def test_what_user_text_may_hold(tts, prompt, text, match):
    wav, _ = prompt
    with pytest.raises(ValueError, match=match):
        next(tts.inference_cross_lingual(text, wav, seed=0))


def test_special_tokens_keep_the_words_around_them_normalised(tts):
    assert tts.frontend.sentences("Say 3 words<|endofprompt|>then 4 more [breath] now.") == [
        "Say three words<|endofprompt|>then four more [breath] now."]


def test_loading_options_and_folders_are_checked_first(tmp_path):
    with pytest.raises(ValueError, match="'bogus' is not a torch device"):
        CosyVoice2.from_pretrained("tiny", device="bogus")
    with pytest.raises(ValueError, match="dtype must be"):
        CosyVoice2.from_pretrained("tiny", dtype="int8")
    assert next(CosyVoice2.from_pretrained("tiny", dtype="bf16").lm.parameters()).dtype == torch.bfloat16
    with pytest.raises(FileNotFoundError, match="is a file; give the model folder"):
        CosyVoice2.from_pretrained(TINY_DIR / "minicosy.json")
    spec = json.loads((TINY_DIR / "minicosy.json").read_text())
    for bad, match in [("{not json", "not valid JSON"), ("[1, 2]", "got a list"),
                       (json.dumps(dict(spec, llm=None)), "'llm' must name a file")]:
        (tmp_path / "minicosy.json").write_text(bad)
        with pytest.raises(ValueError, match=match):
            CosyVoice2.from_pretrained(tmp_path)


def test_a_model_folder_states_its_sampling_settings(tmp_path):
    """``"inference"`` in minicosy.json sets the flow's ODE steps and CFG strength and the LM's RAS
    top-k/top-p of the loaded model; anything else is refused by name."""
    spec = json.loads((TINY_DIR / "minicosy.json").read_text())
    spec = {k: (str(TINY_DIR / v) if isinstance(v, str) and k not in ("format", "preset") else v) for k, v in spec.items()}
    (tmp_path / "minicosy.json").write_text(json.dumps(dict(spec, inference={
        "flow": {"cfg_rate": 2.5, "n_timesteps": 6}, "lm": {"top_k": 10, "in_context_prompt": False}})))
    tts, plain = CosyVoice2.from_pretrained(tmp_path), CosyVoice2.from_pretrained("tiny")
    assert (tts.flow.cfg.cfg_rate, tts.flow.cfg.n_timesteps, tts.lm.cfg.top_k, tts.lm.cfg.in_context_prompt) == (2.5, 6, 10, False)
    assert (plain.flow.cfg.cfg_rate, plain.flow.cfg.n_timesteps, plain.lm.cfg.top_k, plain.lm.cfg.in_context_prompt) == (
        0.7, 10, 25, True)
    assert tts.config.flow.cfg_rate == 2.5
    # without the prompt in the LM's context, zero-shot synthesis is cross-lingual synthesis
    prompt = (np.sin(np.linspace(0, 400, 24000)).astype(np.float32) * 0.3, 24000)
    tts.lm.cfg.top_k = plain.lm.cfg.top_k = 25
    zero_shot = join_speech(tts.inference_zero_shot("We walk home.", "A prompt.", prompt, seed=0))[0]
    assert torch.equal(zero_shot, join_speech(tts.inference_cross_lingual("We walk home.", prompt, seed=0))[0])
    tts.lm.cfg.in_context_prompt = True
    assert not torch.equal(zero_shot, join_speech(tts.inference_zero_shot("We walk home.", "A prompt.", prompt, seed=0))[0])
    for bad, match in [({"flow": {"temperature": 0.5}}, "flow.temperature is not one of"),
                       ({"hift": {}}, "'inference' takes"), ({"lm": {"top_k": 0}}, "must be a positive number"),
                       ({"flow": {"cfg_rate": -1}}, "must be a non-negative number"), ([1], "must map"),
                       ({"lm": {"in_context_prompt": 0}}, "must be true or false")]:
        (tmp_path / "minicosy.json").write_text(json.dumps(dict(spec, inference=bad)))
        with pytest.raises(ValueError, match=match):
            CosyVoice2.from_pretrained(tmp_path)


def test_hub_names_resolve_offline_or_say_what_to_download(tmp_path, monkeypatch):
    """``FunAudioLLM/CosyVoice2-0.5B`` (or ModelScope's ``iic/...``) is looked up in $MINICOSY_HOME
    and the Hugging Face cache (laid out here by hand), never downloaded."""
    from minicosy.pipeline import resolve_model_folder

    monkeypatch.setenv("MINICOSY_HOME", str(tmp_path / "home"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))   # what $HF_HUB_CACHE sets
    with pytest.raises(FileNotFoundError, match="never downloads.*huggingface-cli download FunAudioLLM/CosyVoice2-0.5B"):
        resolve_model_folder("iic/CosyVoice2-0.5B")
    snapshot = tmp_path / "hf" / "models--FunAudioLLM--CosyVoice2-0.5B" / "snapshots" / "abc123"
    shutil.copytree(TINY_DIR, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    assert resolve_model_folder("FunAudioLLM/CosyVoice2-0.5B") == snapshot
    assert resolve_model_folder("iic/CosyVoice2-0.5B") == snapshot
    assert CosyVoice2.from_pretrained("FunAudioLLM/CosyVoice2-0.5B").model_dir == snapshot
    (tmp_path / "home" / "CosyVoice2-0.5B").mkdir(parents=True)
    assert resolve_model_folder("FunAudioLLM/CosyVoice2-0.5B") == tmp_path / "home" / "CosyVoice2-0.5B"


def test_official_folder_without_the_onnx_files_still_speaks_as_a_registered_speaker(tts, prompt, tmp_path):
    """Without campplus.onnx / speech_tokenizer_v2.onnx the folder loads (a warning says what
    is lost), speaks as a speaker registered in its spk2info.pt, and refuses prompt audio clearly."""
    wav, text = prompt
    folder = write_official_folder(tts, tmp_path / "CosyVoice2-tiny", TINY_DIR / "text_tokenizer")
    tts.add_zero_shot_spk(text, wav, "guest")
    try:
        tts.save_spkinfo(folder / "spk2info.pt")
    finally:
        del tts.spk2info["guest"]
    for name in ("campplus.onnx", "speech_tokenizer_v2.onnx"):
        (folder / name).unlink()
    with pytest.warns(UserWarning, match="prompt audio cannot be used"):
        back = CosyVoice2.from_pretrained(folder)
    assert _audio(list(back.inference_zero_shot("Hello there.", "", None, zero_shot_spk_id="guest", seed=0))).shape[1] > 0
    with pytest.raises(FileNotFoundError, match="speech_tokenizer_v2.onnx is missing"):
        next(back.inference_cross_lingual(TEXT, wav))
    (folder / "CosyVoice-BlankEN" / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match="CosyVoice-BlankEN/merges.txt"):
        CosyVoice2.from_pretrained(folder)


def test_the_phone_chain_loads_by_name_and_speaks(vowel):
    """``"tiny-phone"``: the tiny sizes retrained on the large corpus, with reading units as text
    and 729 speech codes; its LM and flow read the codebook of its own speech tokenizer."""
    tts = CosyVoice2.from_pretrained("tiny-phone")
    codes = tts.frontend.speech_tokenizer.codebook_size
    assert codes == 729 and tts.lm.cfg.speech_token_size == codes and tts.flow.cfg.vocab_size == codes
    assert "AH" in tts.frontend.text_tokenizer.vocab          # phones, not BPE pieces
    (wav, sr), prompt_text = vowel
    out = _audio(list(tts.inference_zero_shot(TEXT, prompt_text, (wav, sr), seed=0)))[0]
    assert out.numel() > tts.sample_rate and torch.isfinite(out).all() and out.abs().max() > 1e-3


def test_the_instruct_chain_follows_rate_instructions(corpus_root):
    """``"tiny-phone-instruct"``: the phone chain whose LM was continued with the instruct
    sub-corpus; asked to speak very slowly and very fast, in held-out voices, the very slow
    renderings last clearly longer (its card: speed factors 0.78 and 1.30 over 40 trials)."""
    from minicosy.eval import synthesis_trials
    from minicosy.instruct import instruction, speech_duration

    if not (corpus_root / "manifest.jsonl").exists():
        pytest.skip("corpus not built: run `python -m minicosy.data build`")
    tts = CosyVoice2.from_pretrained("tiny-phone-instruct")
    assert tts.frontend.speech_tokenizer.codebook_size == tts.lm.cfg.speech_token_size == 729
    seconds = {"very_slow": 0.0, "very_fast": 0.0}
    for trial in synthesis_trials(corpus_root, 3):
        prompt = str(corpus_root / trial["prompt"]["path"])
        for cond in seconds:
            wav = join_speech(tts.inference_instruct2(trial["target"]["text"], instruction(cond, "en"), prompt, seed=0))[0]
            seconds[cond] += speech_duration(wav.numpy(), tts.sample_rate)
    assert seconds["very_slow"] > 1.2 * seconds["very_fast"], seconds
