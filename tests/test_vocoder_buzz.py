"""scripts/vocoder_buzz.py: the frame-rate beat of recordings and of HiFT re-syntheses, voice by voice."""
import importlib.util
import json

import numpy as np
import pytest

from .conftest import ROOT

spec = importlib.util.spec_from_file_location("vocoder_buzz", ROOT / "scripts" / "vocoder_buzz.py")
vocoder_buzz = importlib.util.module_from_spec(spec)
spec.loader.exec_module(vocoder_buzz)


def test_the_shipped_phone_vocoder_beats_at_the_frame_rate_and_the_recordings_do_not(corpus_root, tmp_path, capsys):
    if not (corpus_root / "manifest.jsonl").exists():
        pytest.skip("corpus not built: run `python -m minicosy.data build`")
    out = tmp_path / "buzz.json"
    hift = str(ROOT / "data" / "checkpoints" / "hift_phone.pt")
    vocoder_buzz.main(["--corpus", str(corpus_root), "--per-voice", "1", hift, "--json", str(out)])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"A: {hift}" and printed[1].split() == ["voice", "recording", "A"]
    result = json.loads(out.read_text())
    assert result["columns"] == ["recording", hift] and len(result["voices"]) >= 3
    recording = np.median([v["recording"] for v in result["voices"].values()])
    vocoded = np.median([v[hift] for v in result["voices"].values()])
    assert recording < 4 < vocoded          # notebook 07 §6: the tiny HiFT's 50 Hz buzz
