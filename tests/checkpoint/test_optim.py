"""Every torch.optim optimizer, LR scheduler and GradScaler round-trips exactly and trains on identically."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep
from tests.checkpoint.helpers import assert_same_state

OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adamw-amsgrad": lambda p: torch.optim.AdamW(p, lr=0.01, amsgrad=True, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5, centered=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1),
    "adadelta": lambda p: torch.optim.Adadelta(p),
    "adamax": lambda p: torch.optim.Adamax(p, lr=0.01),
    "nadam": lambda p: torch.optim.NAdam(p, lr=0.01),
    "radam": lambda p: torch.optim.RAdam(p, lr=0.01),
    "asgd": lambda p: torch.optim.ASGD(p, lr=0.01),
    "rprop": lambda p: torch.optim.Rprop(p, lr=0.01),
    "lbfgs": lambda p: torch.optim.LBFGS(p, lr=0.5, history_size=3, max_iter=4),
}


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))


def train_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 5, generator=g), torch.randn(16, 2, generator=g)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    return float(opt.step(closure).detach())


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_state_round_trips_and_training_continues_identically(tmp_path: Path, name: str) -> None:
    model = make_model()
    opt = OPTIMIZERS[name](model.parameters())
    for step in range(3):
        train_step(model, opt, step)
    torchkeep.save_checkpoint(tmp_path / "c", model=model, optimizer=opt, rng=False)

    model2 = make_model(seed=1)
    opt2 = OPTIMIZERS[name](model2.parameters())
    torchkeep.load_checkpoint(tmp_path / "c", model=model2, optimizer=opt2, rng=False)
    assert_same_state(opt.state_dict(), opt2.state_dict())
    for step in range(3, 6):
        assert train_step(model, opt, step) == train_step(model2, opt2, step)
    assert_same_state(model.state_dict(), model2.state_dict())


def two_group_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters(), "lr": 0.01}], momentum=0.9
    )


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "step": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=[0.5, 0.05], total_steps=20),
    "cosine-restarts": lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=2),
    "sequential": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o,
        [torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=2),
         torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9)],
        milestones=[2],
    ),
    "chained": lambda o: torch.optim.lr_scheduler.ChainedScheduler(
        [torch.optim.lr_scheduler.ConstantLR(o, factor=0.5, total_iters=3),
         torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.95)]
    ),
    "plateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.5),
    "cyclic": lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=2),
    "polynomial": lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=10, power=2.0),
}  # fmt: skip


def step_scheduler(scheduler: Any, loss: float) -> None:
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(loss)
    else:
        scheduler.step()


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_state_round_trips_and_lr_sequence_continues(tmp_path: Path, name: str) -> None:
    model = make_model()
    opt = two_group_optimizer(model)
    scheduler = SCHEDULERS[name](opt)
    for step in range(4):
        step_scheduler(scheduler, train_step(model, opt, step))
    torchkeep.save_checkpoint(tmp_path / "c", model=model, optimizer=opt, scheduler=scheduler, rng=False)

    model2 = make_model(seed=3)
    opt2 = two_group_optimizer(model2)
    scheduler2 = SCHEDULERS[name](opt2)
    torchkeep.load_checkpoint(tmp_path / "c", model=model2, optimizer=opt2, scheduler=scheduler2, rng=False)
    assert_same_state(scheduler.state_dict(), scheduler2.state_dict())
    for step in range(4, 9):
        step_scheduler(scheduler, train_step(model, opt, step))
        step_scheduler(scheduler2, train_step(model2, opt2, step))
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in opt2.param_groups]
    assert_same_state(model.state_dict(), model2.state_dict())


def test_grad_scaler_round_trips(tmp_path: Path) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(4):
        opt.zero_grad()
        scaler.scale(model(torch.randn(3, 5)).sum()).backward()
        scaler.step(opt)
        scaler.update()
    torchkeep.save_checkpoint(tmp_path / "c", scaler=scaler, rng=False)
    scaler2 = torch.amp.GradScaler("cpu")
    torchkeep.load_checkpoint(tmp_path / "c", scaler=scaler2, rng=False)
    assert_same_state(scaler.state_dict(), scaler2.state_dict())
    assert scaler2.get_scale() == scaler.get_scale()


def test_components_gan_with_two_models_and_two_optimizers(tmp_path: Path) -> None:
    gen, disc = make_model(0), make_model(1)
    opt_g, opt_d = torch.optim.Adam(gen.parameters()), torch.optim.AdamW(disc.parameters())
    train_step(gen, opt_g, 0)
    train_step(disc, opt_d, 1)
    ema = copy.deepcopy(gen)
    components = {"generator": gen, "discriminator": disc, "opt_g": opt_g, "opt_d": opt_d, "ema": ema}
    torchkeep.save_checkpoint(tmp_path / "gan", components=components, rng=False, epoch=7)

    fresh = {
        "generator": make_model(5),
        "discriminator": make_model(6),
        "ema": make_model(7),
    }
    fresh["opt_g"] = torch.optim.Adam(fresh["generator"].parameters())
    fresh["opt_d"] = torch.optim.AdamW(fresh["discriminator"].parameters())
    state = torchkeep.load_checkpoint(tmp_path / "gan", components=fresh, rng=False)
    assert state == {"epoch": 7}
    for key, obj in components.items():
        assert_same_state(obj.state_dict(), fresh[key].state_dict(), key)
