"""The shared training loop: learning-rate schedule and early stopping on a validation score."""
import torch

from minicosy.train import TrainConfig, lr_factor, train_loop


def test_schedule_warms_up_then_decays_to_a_tenth():
    cfg = TrainConfig(warmup_steps=4)
    assert [lr_factor(s, 0.0, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(10, 0.0, cfg) == 1.0 and abs(lr_factor(10, 1.0, cfg) - 0.1) < 1e-12
    assert lr_factor(10, 0.25, cfg) > lr_factor(10, 0.75, cfg)


def test_early_stopping_keeps_the_best_validated_weights():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    scores, seen = iter([5.0, 4.0, 1.5, 3.0, 2.0, 6.0, 7.0, 8.0, 9.0] + [10.0] * 100), []

    def validate() -> float:
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(scores)

    cfg = TrainConfig(lr=0.05, max_steps=8, warmup_steps=1, threads=1, log_every=1, validate_minutes=1e-9)
    log = train_loop(model, iter([(x, y)] * 8), lambda b: torch.nn.functional.mse_loss(model(b[0]), b[1]), cfg,
                     validate=validate)
    assert len(seen) == 9 and [v[2] for v in log.extra["validation"]][:3] == [5.0, 4.0, 1.5]
    assert log.extra["best_validation"] == 1.5 and log.extra["best_step"] == 2
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, seen[2][k])                       # not the last weights
    assert not torch.equal(seen[2]["weight"], seen[-1]["weight"])
