"""The shared training loop: learning-rate schedule and early stopping on a validation score."""
import pytest
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


def test_snapshots_keep_the_weights_of_every_validation(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    seen = []

    def validate() -> float:
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return float(len(seen))

    cfg = TrainConfig(lr=0.05, max_steps=4, warmup_steps=1, threads=1, validate_minutes=1e-9,
                      snapshot_dir=str(tmp_path / "snaps"))
    train_loop(model, iter([(x, y)] * 4), lambda b: torch.nn.functional.mse_loss(model(b[0]), b[1]), cfg,
               validate=validate)
    files = sorted((tmp_path / "snaps").iterdir())
    assert [f.name for f in files] == [f"step{s:07d}.pt" for s in range(5)]
    for k, (f, weights) in enumerate(zip(files, seen)):
        snap = torch.load(f, weights_only=True)
        assert snap["score"] == k + 1 and snap["step"] == k and snap["elapsed"] >= 0
        for k, v in weights.items():
            torch.testing.assert_close(snap["model"][k].float(), v, atol=1e-3, rtol=1e-3)     # float16


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path):
    """With ``state_path`` a run saves its weights, optimiser, step and clock; the same command
    started again continues from there and ends where one uninterrupted run ends."""
    x, y = torch.randn(64, 3, generator=torch.Generator().manual_seed(1)), torch.randn(64, 1)

    def stream(stop_at: int | None = None):
        for i in range(1000):
            if i == stop_at:
                raise KeyboardInterrupt                      # the session ends here
            yield x[i % 8 * 8:(i % 8 + 1) * 8], y[i % 8 * 8:(i % 8 + 1) * 8]

    def run(batches, state=None):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        cfg = TrainConfig(lr=0.05, max_steps=12, warmup_steps=2, threads=1, log_every=1, state_path=state,
                          state_minutes=0.0)
        log = train_loop(model, batches, lambda b: torch.nn.functional.mse_loss(model(b[0]), b[1]), cfg)
        return model, log

    whole, whole_log = run(stream())
    state = tmp_path / "state.pt"
    with pytest.raises(KeyboardInterrupt):
        run(stream(stop_at=7), str(state))
    assert state.exists() and torch.load(state, weights_only=True)["step"] == 7
    resumed, log = run(stream(), str(state))
    assert log.steps == whole_log.steps == list(range(12))
    for k, v in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v)
    assert not state.exists()                                 # finished: nothing left to resume


def test_only_resumable_recipes_offer_a_state_file(capsys):
    """``--state`` is offered by the recipes that save and resume a training state, and refused by
    the others (CAM++, whose margin warms up on the clock, and the fine-tuning experiments)."""
    from minicosy.campplus import train_main as campplus_main
    from minicosy.finetune import finetune_main
    from minicosy.train import recipe_parser

    assert recipe_parser("x", 1.0, "x.pt").parse_args(["--state", "s.pt"]).state == "s.pt"
    for main in (campplus_main, finetune_main):
        with pytest.raises(SystemExit):
            main(["--state", "s.pt", "--minutes", "0"])
        assert "unrecognized arguments: --state" in capsys.readouterr().err
