"""Data-parallel training under torchrun (gloo on CPU): 2 processes stay identical and match one
process that sees the same global batches."""
import os
import subprocess
import sys

import torch

from minicosy.train import TrainConfig, seed_everything, train_loop

from .conftest import ROOT
from .ddp_worker import batches


def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for attempt in range(2):        # a second try only for the launcher's own rendezvous (its port)
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path)], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        if run.returncode == 0 or "rendezvous" not in run.stderr.lower() + run.stdout.lower():
            break
    assert run.returncode == 0, f"torchrun failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    for k, v in ranks[0]["state"].items():                      # the replicas never drift apart
        assert torch.equal(v, ranks[1]["state"][k]), k

    # one process, each step on the two ranks' batches concatenated (the global batch)
    seed_everything(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    local = list(batches())
    merged = iter([tuple(torch.cat(t) for t in zip(local[i], local[i + 1])) for i in range(0, len(local), 2)])
    cfg = TrainConfig(lr=0.05, max_steps=6, warmup_steps=1, threads=1, log_every=1, max_minutes=5)
    log = train_loop(model, merged, lambda b: torch.nn.functional.mse_loss(model(b[0]), b[1]), cfg)
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(log.losses), atol=1e-4, rtol=1e-4)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][k], v, atol=1e-5, rtol=1e-4)
