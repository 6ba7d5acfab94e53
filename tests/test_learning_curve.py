"""scripts/learning_curve.py: the LMs it compares and the training minutes it puts them at."""
import importlib.util

import torch

from minicosy.lm import TextSpeechLM
from minicosy.lm_train import train_lm
from minicosy.train import TrainConfig, save_snapshot

from .conftest import ROOT
from .test_lm_training import TINY, _examples

spec = importlib.util.spec_from_file_location("learning_curve", ROOT / "scripts" / "learning_curve.py")
learning_curve = importlib.util.module_from_spec(spec)
spec.loader.exec_module(learning_curve)


def test_snapshots_and_checkpoints_load_with_their_minutes(tmp_path):
    lm, _ = train_lm(_examples(6), _examples(2, seed=1), TINY, 100, TrainConfig(max_steps=3, warmup_steps=1, threads=1),
                     max_rows=300, out=tmp_path / "lm.pt")
    save_snapshot(tmp_path / "snap.pt", lm, step=3, elapsed=90.0, score=1.0)
    like = TextSpeechLM(TINY, 100)
    snap, minutes, path = learning_curve.load_lm(f"{tmp_path / 'snap.pt'}+10", like)
    assert minutes == 11.5 and path == str(tmp_path / "snap.pt")
    ckpt, minutes, _ = learning_curve.load_lm(str(tmp_path / "lm.pt"), like)
    seconds = torch.load(tmp_path / "lm.pt", weights_only=True)["log"]["seconds"]
    assert minutes == seconds / 60 and not snap.training
    for k, v in ckpt.state_dict().items():                   # both stored in float16
        torch.testing.assert_close(snap.state_dict()[k], v)
