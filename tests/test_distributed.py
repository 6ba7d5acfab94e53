"""Data-parallel training under torchrun (gloo on CPU): 2 processes stay identical and match one
process that sees the same global batches, both through the shared loop (DistributedDataParallel)
and through the hand-averaged gradients of the GAN vocoder's loop."""
import os
import subprocess
import sys

import pytest
import torch

from minicosy.train import TrainConfig, seed_everything, train_loop

from .conftest import ROOT
from .ddp_worker import batches, twice_used_steps


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for attempt in range(2):        # a second try only for the launcher's own rendezvous (its port)
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              str(ROOT / "tests" / "ddp_worker.py"), str(out)], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        if run.returncode == 0 or "rendezvous" not in run.stderr.lower() + run.stdout.lower():
            break
    assert run.returncode == 0, f"torchrun failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def global_batches():
    """The two ranks' batches of each step, concatenated: what one process sees per step."""
    local = list(batches())
    return iter([tuple(torch.cat(t) for t in zip(local[i], local[i + 1])) for i in range(0, len(local), 2)])


def test_two_processes_match_one_process_on_the_same_global_batch(ranks):
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    for k, v in ranks[0]["state"].items():                      # the replicas never drift apart
        assert torch.equal(v, ranks[1]["state"][k]), k
    seed_everything(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    cfg = TrainConfig(lr=0.05, max_steps=6, warmup_steps=1, threads=1, log_every=1, max_minutes=5)
    log = train_loop(model, global_batches(), lambda b: torch.nn.functional.mse_loss(model(b[0]), b[1]), cfg)
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(log.losses), atol=1e-4, rtol=1e-4)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][k], v, atol=1e-5, rtol=1e-4)


def test_gradients_averaged_by_hand_match_one_process(ranks):
    """The GAN vocoder's way (a network run several times per step): rank 0's start broadcast,
    each rank's share of the batches, gradients averaged after backward. One process on the global
    batch takes the same steps; its loss is the ranks' mean (each term averages equal shares)."""
    for k, v in ranks[0]["manual"].items():
        assert torch.equal(v, ranks[1]["manual"][k]), k
    assert all(torch.equal(v, ranks[1]["manual_init"][k]) for k, v in ranks[0]["manual_init"].items())
    single = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    single.load_state_dict(ranks[0]["manual_init"])
    losses = twice_used_steps(single, global_batches())
    mean = [(a + b) / 2 for a, b in zip(ranks[0]["manual_losses"], ranks[1]["manual_losses"])]
    torch.testing.assert_close(torch.tensor(mean), torch.tensor(losses), atol=1e-5, rtol=1e-4)
    for k, v in single.state_dict().items():
        torch.testing.assert_close(ranks[0]["manual"][k], v, atol=1e-5, rtol=1e-4)
