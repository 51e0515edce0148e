"""``torchkeep demo``: train the Iris classifier, save it, load it back, load it partially."""

from __future__ import annotations

import copy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchkeep

SEED = 0
EPOCHS = 300


@torchkeep.register_model
class IrisNet(nn.Module):
    """The tutorial's classifier: Linear(4, 8) - ReLU - Linear(8, classes), with optional dropout."""

    def __init__(self, classes: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, classes))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.drop(self.fc[1](self.fc[0](x)))
        return self.fc[2](hidden)  # type: ignore[no-any-return]


def iris_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled iris, standardised, split 120 / 30 with a fixed seed."""
    try:
        from sklearn.datasets import load_iris
    except ImportError as exc:
        raise ImportError("the demo needs scikit-learn: pip install 'torchkeep[demo]'") from exc
    data = load_iris()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    x = (x - x.mean(0)) / x.std(0)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SEED))
    train, test = order[:120], order[120:]
    return x[train], y[train], x[test], y[test]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    optimizer = torch.optim.Adam(model.parameters(), lr=0.005)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(EPOCHS):
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def run(out_dir: str | Path = "torchkeep-demo") -> int:
    """Run the demo, writing under ``out_dir``; returns a process exit code."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    x_train, y_train, x_test, y_test = iris_data()

    print("== 1. train the Iris classifier (Linear(4,8)-ReLU-Linear(8,3), Adam lr=0.005)")
    model = IrisNet()
    loss = train(model, x_train, y_train)
    model.eval()
    acc = accuracy(model, x_test, y_test)
    print(f"final loss {loss:.4f}, test accuracy {acc:.3f}")

    path = out / "iris.safetensors"
    print(f"\n== 2. save it with torchkeep -> {path}")
    torchkeep.save(model, path, metadata={"task": "iris", "test_accuracy": f"{acc:.4f}"})
    print(torchkeep.inspect(path))

    print("\n== 3. load it into a fresh model")
    fresh = IrisNet()
    fresh.eval()
    report = torchkeep.load_into(fresh, path)
    print(report)
    with torch.no_grad():
        same = torch.equal(model(x_test), fresh(x_test))
    print(f"predictions identical to the trained model: {same}")

    print("\n== 4. a model with a different head (2 classes: setosa or not)")
    binary = IrisNet(classes=2)
    try:
        torchkeep.load_into(binary, path)
    except torchkeep.LoadMismatchError as exc:
        print(f"strict load refused, model untouched: {len(exc.report.mismatched)} mismatched keys")
    partial = torchkeep.load_into(binary, path, strict=False)
    print(partial)
    body_same = torch.equal(binary.state_dict()["fc.0.weight"], model.state_dict()["fc.0.weight"])
    print(f"shared body loaded: {body_same}; the new head keeps its fresh initialisation")

    resumed_same = checkpoint_demo(out)
    model_same = model_demo(out)
    deployed = deploy_demo(out, model, x_test, y_test)

    ok = same and report.ok and body_same and len(partial.mismatched) == 2 and resumed_same and model_same
    ok = ok and deployed
    print(f"\ndemo {'OK' if ok else 'FAILED'}; files are under {out}/")
    return 0 if ok else 1


# -- 5. training checkpoints that survive kill -9 ----------------------------------------------

TOTAL_STEPS = 64  # 8 epochs of 8 batches
KILL_AFTER = 28  # mid-epoch


def train_with_checkpoints(directory: Path, stop_after: int | None = None) -> dict[str, Any]:
    """Train with dropout and a shuffled loader, checkpointing through a manager; resume if it has any."""
    x_train, y_train, x_val, y_val = iris_data()
    data = TensorDataset(x_train, y_train)
    torch.manual_seed(SEED)
    model = IrisNet(dropout=0.2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.005)
    sampler = torchkeep.ResumableSampler(data, seed=SEED)
    loader = DataLoader(data, batch_size=15, sampler=sampler, generator=torch.Generator())
    manager = torchkeep.CheckpointManager(
        directory, keep_last=2, keep_best=1, monitor="val_acc", mode="max", save_every=4
    )
    objects: dict[str, Any] = {"model": model, "optimizer": optimizer, "components": {"sampler": sampler}}
    step, losses = 0, []
    if manager.latest() is not None:
        state = manager.restore(**objects)
        step, losses = state["step"], state["losses"]
        print(f"   resumed from step {step} ({Path(manager.latest().path).name})")  # type: ignore[union-attr]
    loss_fn = nn.CrossEntropyLoss()
    while step < TOTAL_STEPS:
        for x, y in loader:
            model.train()
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            step += 1
            losses.append(loss.item())
            if manager.should_save(step):
                model.eval()
                manager.save(step, metrics={"val_acc": accuracy(model, x_val, y_val)}, losses=losses, **objects)
                if step == stop_after:
                    print(f"   saved step {step}; waiting to be killed", flush=True)
                    time.sleep(600)
            if step >= TOTAL_STEPS:
                break
    manager.close()
    return {"losses": losses, "state": {k: v.clone() for k, v in model.state_dict().items()}}


def _child(directory: str, stop_after: str) -> None:
    train_with_checkpoints(Path(directory), int(stop_after))


def checkpoint_demo(out: Path) -> bool:
    print("\n== 5. checkpoints that survive kill -9: train, SIGKILL mid-epoch, resume")
    runs = out / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    whole = train_with_checkpoints(runs / "uninterrupted")
    print(f"   uninterrupted run: {TOTAL_STEPS} steps, final loss {whole['losses'][-1]:.4f}")

    code = "import sys; from torchkeep.cli.demo import _child; _child(sys.argv[1], sys.argv[2])"
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(runs / "killed"), str(KILL_AFTER)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    print("   child: " + child.stdout.readline().strip())
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()
    print(f"   child killed with SIGKILL (exit {child.returncode})")
    print("   " + "\n   ".join(_ls_lines(runs / "killed")))
    resumed = train_with_checkpoints(runs / "killed")
    same_losses = resumed["losses"] == whole["losses"]
    same_params = all(torch.equal(whole["state"][k], v) for k, v in resumed["state"].items())
    print(f"   resumed run: loss sequence identical: {same_losses}; parameters bit-identical: {same_params}")
    print("   " + "\n   ".join(_ls_lines(runs / "killed")))
    return same_losses and same_params


def _ls_lines(directory: Path) -> list[str]:
    manager = torchkeep.CheckpointManager(directory, read_only=True, monitor="val_acc", mode="max")
    lines = []
    for info in manager.list():
        marks = " ".join(m for m, on in (("latest", info.is_latest), ("best", info.is_best)) if on)
        lines.append(f"{Path(info.path).name}  val_acc={info.metrics['val_acc']:.3f}  {marks}".rstrip())
    return lines


# -- 6. the best model as a whole model, reloaded in a fresh process ---------------------------


def model_demo(out: Path) -> bool:
    print("\n== 6. save the best checkpoint's model with save_model, load_model it in a fresh process")
    manager = torchkeep.CheckpointManager(out / "runs" / "killed", read_only=True, monitor="val_acc", mode="max")
    best = IrisNet(dropout=0.2)
    manager.restore("best", model=best, rng=False, strict=False)
    best.eval()
    model_dir = out / "best-model"
    torchkeep.save_model(best, model_dir)
    print(f"   {model_dir}: " + ", ".join(sorted(p.name for p in model_dir.iterdir())))
    _, _, x_val, _ = iris_data()
    with torch.no_grad():
        torchkeep.save({"x": x_val, "logits": best(x_val)}, out / "best-model-check.safetensors")
    code = (
        "import sys, torch, torchkeep\n"
        "model = torchkeep.load_model(sys.argv[1], allow_modules=['torchkeep.cli.demo'])\n"
        "check = torchkeep.load(sys.argv[2])\n"
        "with torch.no_grad():\n"
        "    same = torch.equal(model(check['x']), check['logits'])\n"
        "print(type(model).__name__, 'eval' if not model.training else 'train', same)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(model_dir), str(out / "best-model-check.safetensors")],
        capture_output=True,
        text=True,
        check=False,
    )
    words = done.stdout.split()
    same = done.returncode == 0 and words[-1:] == ["True"]
    print(f"   fresh process: rebuilt {' '.join(words[:2])}, predictions identical: {same}")
    if done.returncode != 0:
        print(done.stderr)
    return same


# -- 7. deployment: exported and verified, quantized to int8 and reloaded -----------------------

FRESH_INT8 = (
    "import sys, torch, torchkeep\n"
    "model = torchkeep.load_model(sys.argv[1], allow_modules=['torchkeep.cli.demo'])\n"
    "check = torchkeep.load(sys.argv[2])\n"
    "with torch.no_grad():\n"
    "    same = torch.equal(model(check['x']), check['logits'])\n"
    "print(type(model.fc[0].weight).__name__, same)\n"
)


def deploy_demo(out: Path, model: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor) -> bool:
    print("\n== 7. export the Iris model (ONNX, torch.export), verify both; quantize it to int8 and reload it")
    verified = True
    for fmt, name in (("onnx", "iris.onnx"), ("exported_program", "iris.pt2")):
        report = torchkeep.export(model, x_test[:2], out / name, format=fmt)  # type: ignore[arg-type]
        worst = max(o.max_abs for check in report.checks for o in check.outputs)
        checks = ", ".join(check.inputs for check in report.checks)
        print(
            f"   {name}: {report.size:,} bytes, exported in {report.export_seconds:.2f} s, verified on {checks}: "
            f"{'ok' if report.ok else 'FAILED'} (max abs error {worst:.1e}); spec in {Path(report.spec_path).name}"
        )
        verified = verified and report.ok

    torchkeep.save_model(model, out / "iris-fp32")
    quantized = torchkeep.quantize(copy.deepcopy(model), "int8_dynamic")
    torchkeep.save_model(quantized, out / "iris-int8")
    with torch.no_grad():
        torchkeep.save({"x": x_test, "logits": quantized(x_test)}, out / "iris-int8-check.safetensors")
    done = subprocess.run(
        [sys.executable, "-c", FRESH_INT8, str(out / "iris-int8"), str(out / "iris-int8-check.safetensors")],
        capture_output=True,
        text=True,
        check=False,
    )
    words = done.stdout.split()
    same = done.returncode == 0 and words[-1:] == ["True"]
    if done.returncode != 0:
        print(done.stderr)
    fp32_bytes = (out / "iris-fp32" / "model.safetensors").stat().st_size
    int8_bytes = (out / "iris-int8" / "model.safetensors").stat().st_size
    weights_fp32 = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    weights_int8 = sum(t.numel() * t.element_size() for t in torchkeep.load(out / "iris-int8").values())
    print(
        f"   weights: fp32 {weights_fp32:,} bytes -> int8 {weights_int8:,} bytes (int8 data, scales, biases); "
        f"model.safetensors {fp32_bytes:,} -> {int8_bytes:,} bytes (headers dominate a model this small)"
    )
    print(
        f"   test accuracy: fp32 {accuracy(model, x_test, y_test):.3f}, int8 {accuracy(quantized, x_test, y_test):.3f}"
    )
    print(f"   fresh process: reloaded {words[0] if words else '?'} weights, predictions identical: {same}")
    return verified and same
