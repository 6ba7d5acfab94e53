"""End-to-end evaluation and the command line (tts, demo) on the tiny model."""
import json
import re

import numpy as np
import soundfile as sf
import pytest

from minicosy.__main__ import DEMO_MODEL, DEMO_VOICE, main
from minicosy.data import load_manifest
from minicosy.eval import (EVAL_MODES, NO_LM_PROMPT, NO_LM_PROMPT_MODES, READABLE_WER, STAGES, TRUE_INPUT_MODES, _word_stream, evaluate_tts,
                           evaluate_voices, format_table, format_voice_table, recording_wer_by_voice, stage_unit_error,
                           stage_wer, synthesis_trials, voice_trials)
from minicosy.pipeline import CosyVoice2

pytestmark = pytest.mark.usefixtures("single_thread")


def test_synthesis_trials_pair_held_out_sentences_with_another_prompt_of_the_same_voice(corpus_root):
    trials = synthesis_trials(corpus_root, n=6)
    assert len({t["target"]["speaker"] for t in trials}) == 2          # the two held-out English voices
    for t in trials:
        assert t["target"]["split"] == "heldout" == t["prompt"]["split"]
        assert t["target"]["speaker"] == t["prompt"]["speaker"] and t["target"]["id"] != t["prompt"]["id"]
    assert "".join(_word_stream("It costs 5 dollars.")) == "It costs five dollars."


def test_seen_voice_trials_take_dev_test_sentences_of_training_voices_with_a_training_prompt(corpus_root):
    trials = synthesis_trials(corpus_root, n=8, voices="seen")
    held = {t["target"]["speaker"] for t in synthesis_trials(corpus_root, n=2)}
    assert len({t["target"]["speaker"] for t in trials}) > 2 and not held & {t["target"]["speaker"] for t in trials}
    for t in trials:
        assert t["target"]["split"] in ("dev", "test") and t["prompt"]["split"] == "train"
        assert t["target"]["speaker"] == t["prompt"]["speaker"] and t["target"]["lang"] == "en"
    with pytest.raises(ValueError, match="voices must be one of"):
        synthesis_trials(corpus_root, n=1, voices="famous")


def test_evaluate_tts_reports_the_corpus_reference_and_each_mode(corpus_root):
    tts = CosyVoice2.from_pretrained("tiny")
    table = evaluate_tts(tts, corpus_root, n=1, modes=("offline", "LM+FM stream"), progress=False)
    assert list(table) == ["corpus audio", "offline", "LM+FM stream"]
    assert table["corpus audio"]["WER"] < 0.8 and table["corpus audio"]["SIM (resemblyzer)"] > 0.8
    assert all(0 < table[m]["RTF"] and 0 <= table[m]["WER"] for m in ("offline", "LM+FM stream"))
    assert "first package (s)" in format_table(table)
    with pytest.raises(ValueError, match="unknown evaluation modes"):
        evaluate_tts(tts, corpus_root, n=1, modes=("karaoke",))
    assert set(EVAL_MODES) == {"offline", "FM stream", "LM stream", "LM+FM stream"}


def test_voice_trials_give_each_voice_its_own_sentences_and_prompt(corpus_root):
    trials = voice_trials(corpus_root, "heldout", per_voice=3)
    assert set(trials) == {"espeak_en_rp_f", "flite_rms"}              # the held-out English voices
    for voice, vt in trials.items():
        assert len(vt) == 3 and len({t["prompt"]["id"] for t in vt}) == 1
        for t in vt:
            assert t["target"]["speaker"] == t["prompt"]["speaker"] == voice and t["target"]["split"] == "heldout"
            assert t["target"]["text"] != t["prompt"]["text"]
    seen = voice_trials(corpus_root, "seen", per_voice=2)
    assert "hibari_heart" in seen and not set(seen) & set(trials)
    assert all(t["prompt"]["split"] == "train" for vt in seen.values() for t in vt)


def test_a_grown_corpus_keeps_each_evaluation_prompt(corpus_root, tmp_path):
    """The large corpus' second helping (``large_more``, marked in the manifest) never supplies a
    prompt, so growing the corpus leaves every voice's prompt, and so its evaluation, as it was."""
    from minicosy.data import MORE_TIER

    records = load_manifest(corpus_root)
    before = {v: t[0]["prompt"]["id"] for v, t in voice_trials(corpus_root, "seen", per_voice=1).items()}
    grown = records + [dict(r, id=r["id"] + "-more", text=r["text"] + " Again.", duration=4.0, **{MORE_TIER: True})
                       for r in records if r["split"] == "train"]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in grown))
    assert {v: t[0]["prompt"]["id"] for v, t in voice_trials(tmp_path, "seen", per_voice=1).items()} == before


def test_evaluate_voices_compares_each_voice_with_its_own_recordings(corpus_root):
    """Per voice: recordings' and synthesis' WER on the same sentences, pooled over the voices the
    judge reads (flite_rms: WER about 0.1) and over all of them."""
    result = evaluate_voices(CosyVoice2.from_pretrained("tiny"), corpus_root, "heldout", per_voice=2, progress=False)
    assert set(result["voices"]) == {"espeak_en_rp_f", "flite_rms"} and result["modes"] == ["offline"]
    row = result["voices"]["flite_rms"]
    assert row["n"] == 2 and 0 <= row["WER recordings"] and row["WER offline"] >= 0 and -1 <= row["SIM offline (CAM++)"] <= 1
    assert result["pooled"]["all"]["n"] == 4
    if "readable" in result["pooled"]:
        assert all(result["voices"][v]["WER recordings"] <= READABLE_WER for v in result["pooled"]["readable"]["voices"])
    assert len(row["hyps"]["offline"]) == len(row["refs"]) == 2          # kept, for paired comparisons
    assert np.mean(row["sims"]["offline"][1]) == pytest.approx(row["SIM offline (CAM++)"])
    lo, hi = result["pooled"]["all"]["WER offline 95%"]
    assert lo <= result["pooled"]["all"]["WER offline"] <= hi
    text = format_voice_table(result)
    assert "flite_rms" in text and "pooled: all" in text and "95% (bootstrap)" in text
    by_voice = recording_wer_by_voice(corpus_root, ("heldout",), per_voice=2, progress=False)
    assert by_voice["flite_rms"]["WER"] == row["WER recordings"]      # the same recordings, the same judge


def test_evaluate_voices_takes_the_stage_table_per_voice(corpus_root):
    """The true-input modes re-make each voice's recordings from their true mel or tokens, beside
    the zero-shot synthesis of the same sentences: bar 4's stage table, like with like."""
    modes = (*TRUE_INPUT_MODES, "offline", *NO_LM_PROMPT_MODES)
    result = evaluate_voices(CosyVoice2.from_pretrained("tiny"), corpus_root, "heldout", per_voice=2, modes=modes,
                             progress=False)
    row = result["voices"]["flite_rms"]
    assert result["modes"] == list(modes) and all(len(row["hyps"][m]) == 2 for m in modes)
    assert row["WER GL true mel"] <= row["WER recordings"] + 0.34     # Griffin-Lim keeps most words
    assert "delta offline 95%" in result["pooled"]["all"]             # each stage against the first
    assert (row["hyps"][NO_LM_PROMPT], row["SIM no LM prompt (CAM++)"]) != (row["hyps"]["offline"], row["SIM offline (CAM++)"])
    assert "HiFT true mel" in format_voice_table(result)
    with pytest.raises(ValueError, match="flow true tokens"):
        evaluate_voices(CosyVoice2.from_pretrained("tiny"), corpus_root, "heldout", per_voice=1, modes=("HiFT",))


def test_eval_command_per_voice(corpus_root, capsys):
    main(["eval", "--corpus", str(corpus_root), "--per-voice", "1", "--modes", "offline", "--threads", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["voice", "n", "WER"] and any(line.startswith("pooled: all") for line in lines)


def test_eval_command_top_k_sets_the_samplers_k_and_refuses_zero(corpus_root, tmp_path, capsys):
    out = tmp_path / "voices.json"
    main(["eval", "--corpus", str(corpus_root), "--per-voice", "1", "--modes", "offline", "--threads", "1",
          "--top-k", "5", "--json", str(out)])
    assert json.loads(out.read_text())["top_k"] == 5
    with pytest.raises(SystemExit):
        main(["eval", "--corpus", str(corpus_root), "--per-voice", "1", "--top-k", "0"])
    assert "--top-k must be at least 1" in capsys.readouterr().err


def test_eval_command_instructions_prints_each_condition_and_the_cost(corpus_root, tmp_path, capsys):
    out = tmp_path / "instructions.json"
    main(["eval", "--corpus", str(corpus_root), "--instructions", "--n", "1", "--threads", "1", "--json", str(out)])
    lines = capsys.readouterr().out.splitlines()
    conditions = ["very_slow", "slow", "fast", "very_fast", "high_pitch", "low_pitch", "emphasis"]
    assert lines[0].split()[0] == "instruction" and [ln.split()[0] for ln in lines[1:8]] == conditions
    assert all("n=1" in ln and "n=12" in ln for ln in lines[1:8])        # the model's trial, the corpus' renderings
    assert [ln.split()[-1] for ln in lines[-2:]] == ["1", "7"]            # without / with an instruction
    result = json.loads(out.read_text())
    assert list(result["changes"]) == conditions and all(len(v) == 1 for v in result["changes"].values())
    assert result["quality"]["with instruction"]["n"] == 7


def test_eval_command_pitch_carriers_prints_each_carrier(corpus_root, tmp_path, capsys):
    from minicosy.eval_instruct import PITCH_CARRIERS

    if not (corpus_root / "instruct" / "manifest.jsonl").exists():
        pytest.skip("instruct sub-corpus not built: run `python -m minicosy.data build`")
    out = tmp_path / "pitch.json"
    main(["eval", "--corpus", str(corpus_root), "--pitch-carriers", "--n", "2", "--threads", "1", "--json", str(out)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["condition", "carrier"] and len(lines) == 1 + 2 * len(PITCH_CARRIERS)
    result = json.loads(out.read_text())
    assert list(result) == ["high_pitch", "low_pitch"]
    assert all(list(v) == list(PITCH_CARRIERS) and all(len(x) == 2 for x in v.values()) for v in result.values())
    # the engines' renderings moved as asked, by pYIN and (the way asked) by the instrument that measures the flow
    assert all(x > 1 for x in result["high_pitch"]["recordings (pYIN)"])
    assert all(x < -1 for x in result["low_pitch"]["recordings (pYIN)"])
    assert all(x > 0 for x in result["high_pitch"]["recordings (F0 predictor)"])
    assert all(x < 0 for x in result["low_pitch"]["recordings (F0 predictor)"])


def test_eval_command_compare_prints_the_paired_difference(tmp_path, capsys):
    refs = ["the first sentence", "a second one here", "and the third"]
    result = {"modes": ["offline"], "voices": {"v": {"refs": refs, "hyps": {"offline": refs}, "sims": {"offline": [[0.5] * 3] * 2}}},
              "pooled": {"readable": {"voices": ["v"]}}}
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(result))
    result["voices"]["v"]["hyps"]["offline"] = ["the first sentence", "a second one", "and the third"]
    b.write_text(json.dumps(result))
    main(["eval", "--compare", str(a), str(b)])
    out = capsys.readouterr().out
    assert "B - A +0.100" in out and "SIM CAM++" in out and "pooled: all" not in out
    with pytest.raises(SystemExit):
        main(["eval", "--compare", str(a), str(tmp_path / "missing.json")])
    assert "missing.json" in capsys.readouterr().err


def test_stage_wer_follows_the_pipeline_stage_by_stage(corpus_root):
    wer = stage_wer(CosyVoice2.from_pretrained("tiny"), corpus_root, n=1)
    assert tuple(wer) == STAGES and all(v >= 0 for v in wer.values())
    assert wer["corpus audio"] < 0.8


def test_eval_command_prints_the_table_and_the_stages(corpus_root, capsys):
    main(["eval", "--corpus", str(corpus_root), "--n", "1", "--modes", "offline", "--stages", "--threads", "1",
          "--voices", "seen"])
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("offline") for line in lines)
    rows = {stage: line.split()[-2:] for line in lines for stage in STAGES if line.startswith(stage + " ")}
    assert list(rows) == list(STAGES) and all(0 <= float(v) for row in rows.values() for v in row)


def test_stage_unit_error_reads_each_stage_with_the_tokenizers_asr_head(corpus_root):
    errors = stage_unit_error(CosyVoice2.from_pretrained("tiny"), corpus_root, n=1)
    assert tuple(errors) == STAGES and all(v >= 0 for v in errors.values())
    assert errors["corpus audio"] < 0.9          # an untrained head gets about all units wrong


def test_tts_command_writes_a_wav_and_prints_latencies(corpus_root, tmp_path, capsys):
    prompt = synthesis_trials(corpus_root, n=1)[0]["prompt"]
    out = tmp_path / "x.wav"
    main(["tts", "--text", "We walk to the park.", "--prompt-wav", str(corpus_root / prompt["path"]),
          "--prompt-text", prompt["text"], "--stream", "--out", str(out), "--threads", "1"])
    wav, sr = sf.read(out)
    printed = capsys.readouterr().out
    assert sr == 24000 and len(wav) > 0 and len(wav) % 960 == 0
    assert "first package after" in printed and "eq. 11" in printed


def test_tts_command_speaks_in_the_default_voice_and_fails_in_one_line(corpus_root, tmp_path, capsys):
    out = tmp_path / "default.wav"
    main(["tts", "--text", "Hello there.", "--out", str(out), "--threads", "1"])
    assert "speaking as 'hibari_heart'" in capsys.readouterr().out and len(sf.read(out)[0]) > 0
    wav = str(corpus_root / synthesis_trials(corpus_root, n=1)[0]["prompt"]["path"])
    for args, match in [(["--prompt-wav", wav, "--instruct", ""], "instruct_text is empty"),
                        (["--prompt-wav", "no/such.wav"], "does not exist"),
                        (["--out", str(tmp_path)], "must name a .wav file"),
                        (["--out", str(tmp_path / "x.txt")], "must name a .wav file"),
                        (["--spk-id", "nobody"], "unknown speaker id")]:
        with pytest.raises(SystemExit) as stop:
            main(["tts", "--text", "Hi there.", "--out", str(tmp_path / "y.wav"), "--threads", "1", *args])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith("minicosy tts: error:") and match in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1


def test_demo_speaks_a_held_out_sentence(corpus_root, tmp_path, capsys):
    main(["demo", "--root", str(corpus_root), "--out", str(tmp_path / "demo.wav")])
    printed = capsys.readouterr().out
    assert (tmp_path / "demo.wav").exists()
    assert "held-out voice" in printed and "pocketsphinx hears" in printed and "RTF" in printed
    assert f"prompt: {DEMO_VOICE} (held-out voice)" in printed and f"model:  {DEMO_MODEL}" in printed
    heard = re.search(r"pocketsphinx hears: .* \(WER ([0-9.]+)\); on the corpus recording .* \(WER ([0-9.]+)\)", printed)
    # issue 20's bar 5: the judge reads the demo (0.00 where it was measured, both; a margin for other CPUs)
    assert heard and float(heard[1]) <= 0.5 and float(heard[2]) <= 0.3
