"""load_checkpoint's checks before anything is modified: optimizer state shapes, the objects a file holds,
map_location, and errors that name what is wrong."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep
from tests.checkpoint.helpers import assert_same_state

X = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))


def net(classes: int = 3, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, classes))


def trained(optimizer: Any = torch.optim.Adam, **kwargs: Any) -> tuple[nn.Sequential, torch.optim.Optimizer]:
    model = net()
    opt = optimizer(model.parameters(), **kwargs)
    for _ in range(2):
        opt.zero_grad()
        model(X).sum().backward()
        opt.step()
    return model, opt


def saved_both_ways(tmp_path: Path, model: nn.Module, opt: Any) -> list[Path]:
    """The same state as the tutorials' torch.save dict and as a torchkeep checkpoint."""
    pth = tmp_path / "ck.pth"
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(), "epoch": 1}, pth)
    torchkeep.save_checkpoint(tmp_path / "ck", model=model, optimizer=opt, epoch=1, rng=False)
    return [pth, tmp_path / "ck"]


def step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(X).sum().backward()
    opt.step()


# 1. optimizer state shapes


@pytest.mark.parametrize("kind", ["pth", "torchkeep"])
def test_an_optimizer_over_the_parameters_in_another_order_is_refused_strictly(tmp_path: Path, kind: str) -> None:
    source = saved_both_ways(tmp_path, *trained())[0 if kind == "pth" else 1]
    model = net(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam([*model[2].parameters(), *model[0].parameters()])
    with pytest.raises(torchkeep.StateMismatchError) as caught:
        torchkeep.load_checkpoint(source, model=model, optimizer=opt, rng=False)
    message = str(caught.value)
    assert str(source) in message
    assert "'2.weight' (saved exp_avg [16, 4], parameter [3, 16])" in message
    assert "'0.bias' (saved exp_avg [3], parameter [16])" in message
    assert "nothing changed" in message
    assert_same_state(before, dict(model.state_dict()))  # the model was not touched either
    assert not opt.state


@pytest.mark.parametrize("kind", ["pth", "torchkeep"])
def test_a_new_head_with_strict_false_starts_its_optimizer_state_fresh(tmp_path: Path, kind: str) -> None:
    old_model, old_opt = trained()
    source = saved_both_ways(tmp_path, old_model, old_opt)[0 if kind == "pth" else 1]
    model = net(classes=10, seed=1)
    opt = torch.optim.Adam(model.parameters())
    with pytest.warns(torchkeep.TorchkeepWarning, match=r"optimizer state of 2 parameter\(s\)") as caught:
        torchkeep.load_checkpoint(source, model=model, optimizer=opt, strict=False, rng=False)
    message = " ".join(str(w.message) for w in caught)
    assert "'2.weight' (saved exp_avg [3, 16], parameter [10, 16])" in message and "'2.bias'" in message
    assert all(w.filename == __file__ for w in caught)  # points at the caller's line
    saved = old_opt.state_dict()["state"]
    restored = opt.state_dict()["state"]
    assert set(restored) == {0, 1}  # the backbone's state; the head's was dropped
    for index in (0, 1):
        assert_same_state(saved[index], restored[index])
    step(model, opt)  # the head's state starts fresh, the backbone's continues
    assert opt.state_dict()["state"][2]["step"].item() == 1
    assert opt.state_dict()["state"][0]["step"].item() == 3


def test_the_parameter_is_named_by_position_without_a_model(tmp_path: Path) -> None:
    _, old_opt = trained(torch.optim.SGD, lr=0.1, momentum=0.9)
    torchkeep.save_checkpoint(tmp_path / "ck", optimizer=old_opt, rng=False)
    model = net(classes=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(torchkeep.StateMismatchError, match=r"group 0, parameter 2 \(saved momentum_buffer \[3, 16\]"):
        torchkeep.load_checkpoint(tmp_path / "ck", optimizer=opt, rng=False)


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        lambda p: torch.optim.AdamW(p, amsgrad=True),
        lambda p: torch.optim.RMSprop(p, momentum=0.5, centered=True),
        lambda p: torch.optim.Adagrad(p),
        lambda p: torch.optim.Adadelta(p),
        lambda p: torch.optim.Adamax(p),
        lambda p: torch.optim.NAdam(p),
        lambda p: torch.optim.RAdam(p),
        lambda p: torch.optim.ASGD(p),
        lambda p: torch.optim.Rprop(p),
        lambda p: torch.optim.Adafactor(p),
    ],
)
def test_matching_state_of_every_optimizer_restores_and_steps(tmp_path: Path, make: Any) -> None:
    model = net()
    opt = make(model.parameters())
    step(model, opt)
    torchkeep.save_checkpoint(tmp_path / "ck", model=model, optimizer=opt, rng=False)
    model2 = net(seed=1)
    opt2 = make(model2.parameters())
    torchkeep.load_checkpoint(tmp_path / "ck", model=model2, optimizer=opt2, rng=False)
    assert_same_state(opt.state_dict(), opt2.state_dict())
    step(model, opt)
    step(model2, opt2)
    assert_same_state(dict(model.state_dict()), dict(model2.state_dict()))


class FactoredMomentum(torch.optim.Optimizer):
    """A custom optimizer whose ``exp_avg`` is not shaped like its parameter."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, {"lr": 0.1})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                state.setdefault("exp_avg", torch.zeros(p.shape[:1]))
                state["exp_avg"].add_(p.grad.reshape(p.shape[0], -1).mean(1))


def test_a_custom_optimizer_keeps_its_own_slot_shapes(tmp_path: Path) -> None:
    model = net()
    opt = FactoredMomentum(model.parameters())
    step(model, opt)
    torchkeep.save_checkpoint(tmp_path / "ck", model=model, optimizer=opt, rng=False)
    opt2 = FactoredMomentum(net(seed=1).parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torchkeep.load_checkpoint(tmp_path / "ck", optimizer=opt2, rng=False)
    assert_same_state(opt.state_dict(), opt2.state_dict())


# 2. a file holding one object's state alone


def test_a_file_holding_only_an_optimizer_state_restores_it(tmp_path: Path) -> None:
    model, opt = trained()
    path = tmp_path / "opt_only.pth"
    torch.save(opt.state_dict(), path)
    with pytest.raises(torchkeep.CorruptCheckpointError) as caught:  # load reads weights; it says which call works
        torchkeep.load(path)
    assert "the file itself is intact" in str(caught.value)
    assert "load_checkpoint(path, optimizer=...) restores it" in str(caught.value)

    model2 = net(seed=1)
    model2.load_state_dict(model.state_dict())
    opt2 = torch.optim.Adam(model2.parameters())
    assert torchkeep.load_checkpoint(path, optimizer=opt2, rng=False) == {}
    assert_same_state(opt.state_dict(), opt2.state_dict())
    step(model, opt)
    step(model2, opt2)
    assert_same_state(dict(model.state_dict()), dict(model2.state_dict()))


def test_a_file_holding_only_a_scheduler_or_a_scaler_state_restores_it(tmp_path: Path) -> None:
    model, opt = trained()
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(3):
        step(model, opt)
        scheduler.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0, growth_interval=7)
    torch.save(scheduler.state_dict(), tmp_path / "sched.pth")
    torch.save(scaler.state_dict(), tmp_path / "scaler.pth")
    with pytest.raises(torchkeep.CorruptCheckpointError, match=r"load_checkpoint\(path, scaler=\.\.\.\) restores it"):
        torchkeep.load(tmp_path / "scaler.pth")

    _, opt2 = trained()
    scheduler2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    torchkeep.load_checkpoint(tmp_path / "sched.pth", scheduler=scheduler2, rng=False)
    assert_same_state(scheduler.state_dict(), scheduler2.state_dict())
    scaler2 = torch.amp.GradScaler("cpu")
    torchkeep.load_checkpoint(tmp_path / "scaler.pth", scaler=scaler2, rng=False)
    assert scaler2.state_dict() == scaler.state_dict()


def test_asking_for_a_model_from_an_optimizer_state_file_names_the_model(tmp_path: Path) -> None:
    _, opt = trained()
    torch.save(opt.state_dict(), tmp_path / "opt_only.pth")
    with pytest.raises(torchkeep.LoadMismatchError, match="model"):
        torchkeep.load_checkpoint(tmp_path / "opt_only.pth", model=net(), optimizer=opt, rng=False)


# 4. map_location


def every_kind(tmp_path: Path) -> dict[str, Path]:
    """One model's state as each kind of input load_checkpoint reads, with a tensor value beside it."""
    import torch.distributed.checkpoint as dcp

    model = net()
    loss = torch.tensor(1.5)
    paths = {kind: tmp_path / name for kind, name in
             [("pth", "ck.pth"), ("safetensors", "w.safetensors"), ("dcp", "dcp"), ("torchkeep", "ck")]}  # fmt: skip
    torch.save({"model_state_dict": model.state_dict(), "loss": loss}, paths["pth"])
    torchkeep.save(model, paths["safetensors"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that no process group is initialised
        dcp.save({"model": model.state_dict(), "loss": loss}, checkpoint_id=paths["dcp"])
    torchkeep.save_checkpoint(paths["torchkeep"], model=model, loss=loss, rng=False)
    return paths


@pytest.mark.parametrize("kind", ["pth", "safetensors", "dcp", "torchkeep"])
def test_a_bad_map_location_is_refused_before_anything_is_read(tmp_path: Path, kind: str) -> None:
    source = every_kind(tmp_path)[kind]
    model = net(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(torchkeep.InvalidDeviceError, match="bogus"):
        torchkeep.load_checkpoint(source, model=model, map_location="bogus", rng=False)
    with pytest.raises(
        TypeError, match=r"map_location must be a str, torch\.device, dict or callable, not int"
    ) as caught:
        torchkeep.load_checkpoint(source, model=model, map_location=42, rng=False)  # type: ignore[arg-type]
    assert not isinstance(caught.value, torchkeep.CorruptCheckpointError)  # the file is not to blame
    assert_same_state(before, dict(model.state_dict()))


@pytest.mark.parametrize("kind", ["pth", "safetensors", "dcp", "torchkeep"])
def test_map_location_is_applied_to_every_kind_of_input(tmp_path: Path, kind: str) -> None:
    source = every_kind(tmp_path)[kind]
    placed: list[str] = []

    def where(storage: Any, location: str) -> None:
        placed.append(location)

    model = net(seed=1)
    torchkeep.load_checkpoint(source, model=model, map_location=where, rng=False)
    assert len(placed) >= 4  # the model's four tensors at least went through map_location
    assert_same_state(dict(net().state_dict()), dict(model.state_dict()))
    if kind != "safetensors":  # values come back where map_location says
        values = torchkeep.load_checkpoint(source, map_location="meta", rng=False)
        assert values["loss"].device.type == "meta"


# 5. errors that name what is wrong


@pytest.mark.parametrize("kind", ["pth", "torchkeep"])
def test_a_scheduler_the_checkpoint_lacks_is_named(tmp_path: Path, kind: str) -> None:
    model, opt = trained()
    source = saved_both_ways(tmp_path, model, opt)[0 if kind == "pth" else 1]
    model2, opt2 = net(seed=1), torch.optim.Adam(net(seed=1).parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(opt2, step_size=3)
    before = {k: v.clone() for k, v in model2.state_dict().items()}
    with pytest.raises(torchkeep.LoadMismatchError) as caught:
        torchkeep.load_checkpoint(source, model=model2, optimizer=opt2, scheduler=scheduler, rng=False)
    message = str(caught.value)
    assert message.startswith(f"{source}: the checkpoint holds no state for the scheduler (it holds: model, optim")
    assert "strict=False" in message and "remap" not in message and "in the model" not in message
    assert caught.value.report.missing == ["scheduler"]
    assert_same_state(before, dict(model2.state_dict()))
    with pytest.warns(torchkeep.TorchkeepWarning, match="holds no state for the scheduler; left as it is") as warned:
        torchkeep.load_checkpoint(source, model=model2, scheduler=scheduler, strict=False, rng=False)
    assert all(w.filename == __file__ for w in warned)
    assert_same_state(dict(model.state_dict()), dict(model2.state_dict()))


def test_a_missing_component_is_named_as_passed(tmp_path: Path) -> None:
    model, _ = trained()
    torchkeep.save_checkpoint(tmp_path / "ck", model=model, rng=False)
    ema = net(seed=2)
    with pytest.raises(torchkeep.LoadMismatchError, match=r"no state for the components\['ema'\] \(it holds: model\)"):
        torchkeep.load_checkpoint(tmp_path / "ck", components={"ema": ema}, rng=False)


@pytest.mark.parametrize("kind", ["pth", "torchkeep"])
@pytest.mark.parametrize(
    ("saved_with", "loaded_into", "names"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), torch.optim.Adam, "['dampening', 'momentum', 'nesterov']"),
        (torch.optim.Adam, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "['amsgrad', 'betas'"),
        # hyperparameters alike (Adam's are Adamax's and more): told apart by the slots each keeps
        (torch.optim.Adamax, torch.optim.Adam, "['exp_inf']"),
        (torch.optim.Adam, torch.optim.Adamax, "['exp_avg_sq']"),
    ],
)
def test_state_of_another_optimizer_class_is_refused(
    tmp_path: Path, kind: str, saved_with: Any, loaded_into: Any, names: str
) -> None:
    source = saved_both_ways(tmp_path, *trained(saved_with))[0 if kind == "pth" else 1]
    model = net(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = loaded_into(model.parameters())
    with pytest.raises(torchkeep.StateMismatchError) as caught:
        torchkeep.load_checkpoint(source, model=model, optimizer=opt, rng=False)
    message = str(caught.value)
    assert str(source) in message and "from another optimizer" in message and names in message
    assert_same_state(before, dict(model.state_dict()))
    assert not opt.state


def test_hyperparameters_added_by_a_newer_torch_or_a_scheduler_still_load(tmp_path: Path) -> None:
    model, opt = trained()
    state = opt.state_dict()
    for group in state["param_groups"]:  # as an older torch saved it, with a scheduler's initial_lr
        del group["decoupled_weight_decay"], group["fused"]
        group["initial_lr"] = group["lr"]
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": state}, tmp_path / "old.pth")
    model2 = net(seed=1)
    opt2 = torch.optim.Adam(model2.parameters())
    torchkeep.load_checkpoint(tmp_path / "old.pth", model=model2, optimizer=opt2, rng=False)
    assert_same_state(opt.state_dict()["state"], opt2.state_dict()["state"])
    step(model, opt)
    step(model2, opt2)
    assert_same_state(dict(model.state_dict()), dict(model2.state_dict()))


def test_a_subclass_of_a_torch_optimizer_keeps_slots_of_its_own(tmp_path: Path) -> None:
    """A subclass (an Adam keeping an EMA per parameter) is a custom optimizer: its slots are its own."""

    class EMAAdam(torch.optim.Adam):
        @torch.no_grad()
        def step(self, closure: Any = None) -> Any:
            loss = super().step(closure)
            for group in self.param_groups:
                for p in group["params"]:
                    state = self.state[p]
                    state["ema"] = state.get("ema", torch.zeros_like(p)) * 0.9 + p * 0.1
            return loss

    model, opt = trained(EMAAdam)
    torchkeep.save_checkpoint(tmp_path / "ck", model=model, optimizer=opt)
    model2 = net(seed=1)
    opt2 = EMAAdam(model2.parameters())
    torchkeep.load_checkpoint(tmp_path / "ck", model=model2, optimizer=opt2)
    assert_same_state(opt.state_dict()["state"], opt2.state_dict()["state"])
