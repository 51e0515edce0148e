"""``torchkeep demo``: train the Iris classifier, save it, load it back, load it partially."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import torchkeep

SEED = 0
EPOCHS = 300


class IrisNet(nn.Module):
    """The tutorial's classifier: Linear(4, 8) - ReLU - Linear(8, classes)."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)  # type: ignore[no-any-return]


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

    ok = same and report.ok and body_same and len(partial.mismatched) == 2
    print(f"\ndemo {'OK' if ok else 'FAILED'}; files are under {out}/")
    return 0 if ok else 1
