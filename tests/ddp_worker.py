"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2``: a few data-parallel steps
of the shared training loop on a toy regression; each rank saves its parameters and loss log."""
import sys

import torch

from minicosy.train import TrainConfig, distributed, seed_everything, train_loop


def batches(n: int = 12, size: int = 8):
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(size, 5, generator=g), torch.randn(size, 1, generator=g)) for _ in range(n)]
    return iter(data)


def run(out: str) -> None:
    seed_everything(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    cfg = TrainConfig(lr=0.05, max_steps=6, warmup_steps=1, threads=1, log_every=1, max_minutes=5)
    log = train_loop(model, batches(), lambda b: torch.nn.functional.mse_loss(model(b[0]), b[1]), cfg)
    rank, world = distributed()
    torch.save({"state": model.state_dict(), "losses": log.losses, "world": world}, f"{out}/rank{rank}.pt")


if __name__ == "__main__":
    run(sys.argv[1])
