"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2``: a few data-parallel steps
of the shared training loop on a toy regression; each rank saves its parameters and loss log."""
import sys

import torch

from minicosy.train import (TrainConfig, average_gradients, broadcast_parameters, distributed, local_batch,
                            seed_everything, train_loop)


def batches(n: int = 12, size: int = 8):
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(size, 5, generator=g), torch.randn(size, 1, generator=g)) for _ in range(n)]
    return iter(data)


def twice_used_steps(model: torch.nn.Module, stream, steps: int = 4) -> list[float]:
    """A hand-written loop like the GAN vocoder's: the model runs twice per step (on the input and
    on its negation), gradients are averaged by hand; returns the step losses."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(steps):
        x, y = local_batch(stream)
        loss = torch.nn.functional.mse_loss(model(x), y) + model(-x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        average_gradients(model)
        opt.step()
        losses.append(loss.item())
    return losses


def run(out: str) -> None:
    seed_everything(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    cfg = TrainConfig(lr=0.05, max_steps=6, warmup_steps=1, threads=1, log_every=1, max_minutes=5)
    log = train_loop(model, batches(), lambda b: torch.nn.functional.mse_loss(model(b[0]), b[1]), cfg)
    rank, world = distributed()
    torch.manual_seed(rank)                  # different draws per rank: the broadcast makes them equal
    manual = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    broadcast_parameters(manual)
    torch.save({"state": model.state_dict(), "losses": log.losses, "world": world,
                "manual_init": {k: v.clone() for k, v in manual.state_dict().items()},
                "manual_losses": twice_used_steps(manual, batches()), "manual": manual.state_dict()},
               f"{out}/rank{rank}.pt")


if __name__ == "__main__":
    run(sys.argv[1])
