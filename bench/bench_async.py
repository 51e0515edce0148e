"""Async checkpoints: how long the caller is blocked, and how much a background write slows training.

    .venv/bin/python bench/bench_async.py [--params 85e6] [--repeat 5] [--dir /tmp/tk-async]

The state is a model of --params float32 parameters with AdamW (three copies: weights, exp_avg,
exp_avg_sq). Measured in one run, min / median of --repeat:
- memcpy floor: copying every state tensor into buffers allocated beforehand (what a snapshot must do);
- torchkeep stall: CheckpointManager(async_save=True).save() until it returns (saves after the first,
  which allocates the staging buffers; that first one is reported apart);
- DCP stall: torch.distributed.checkpoint.async_save(...) until it returns (its own staging);
- training: the time of one step of a small CPU training loop (one thread) with no write, and while a
  background write of the state runs on the other core.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torchkeep  # noqa: E402


def big_state(params: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    width = 4096
    layers = max(1, params // (width * width))
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    return model, optimizer


def tensors_of(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = [t for t in model.state_dict().values()]
    for per_param in optimizer.state.values():
        out += [v for v in per_param.values() if isinstance(v, torch.Tensor) and v.dim()]
    return out


def stats(values: list[float]) -> str:
    return f"{min(values):.3f} / {statistics.median(values):.3f}"


def train_steps(count: int) -> list[float]:
    """Step times of a small MLP on one thread."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(256, 512), torch.randint(0, 10, (256,))
    times = []
    for _ in range(count):
        start = time.perf_counter()
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=float, default=85e6)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(args.dir or tempfile.mkdtemp(prefix="tk-async-"))
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    model, optimizer = big_state(int(args.params))
    state = tensors_of(model, optimizer)
    nbytes = sum(t.numel() * t.element_size() for t in state)
    print(f"state: {nbytes / 1e9:.2f} GB in {len(state)} tensors")

    buffers = [torch.empty_like(t) for t in state]
    for b, t in zip(buffers, state, strict=True):
        b.copy_(t)  # fault the pages in once
    memcpy = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        for b, t in zip(buffers, state, strict=True):
            b.copy_(t)
        memcpy.append(time.perf_counter() - start)
    del buffers

    results: dict[str, Any] = {"memcpy": memcpy}
    mgr = torchkeep.CheckpointManager(root / "run", keep_last=1, async_save=True)
    stalls, first = [], 0.0
    for step in range(args.repeat + 1):
        start = time.perf_counter()
        mgr.save(step, model=model, optimizer=optimizer)
        elapsed = time.perf_counter() - start
        if step == 0:
            first = elapsed
        else:
            stalls.append(elapsed)
        mgr.wait()
    results["torchkeep"] = stalls

    # Training alone, then training while one background save of the state runs.
    alone = train_steps(40)[5:]
    mgr.save(args.repeat + 1, model=model, optimizer=optimizer)
    during = []
    pending = mgr._pending
    while pending is not None and not pending.done():
        during += train_steps(3)
    mgr.close()

    dcp: list[float] = []
    try:
        import torch.distributed.checkpoint as dcp_module

        for i in range(args.repeat):
            start = time.perf_counter()
            future = dcp_module.async_save(
                {"model": model.state_dict(), "optim": optimizer.state_dict()}, checkpoint_id=str(root / f"dcp-{i}")
            )
            dcp.append(time.perf_counter() - start)
            future.result()
            shutil.rmtree(root / f"dcp-{i}", ignore_errors=True)
    except Exception as exc:
        print(f"DCP async_save: not measured ({type(exc).__name__}: {exc})")
    shutil.rmtree(root, ignore_errors=True)

    floor = min(memcpy)
    print("| measure | min / median s | ratio to the memcpy floor (min) |")
    print("|---|---|---|")
    print(f"| memcpy of the state into ready buffers | {stats(memcpy)} | 1.00 |")
    print(f"| torchkeep async save, caller blocked (first, allocating) | {first:.3f} | {first / floor:.2f} |")
    print(f"| torchkeep async save, caller blocked (later saves) | {stats(stalls)} | {min(stalls) / floor:.2f} |")
    if dcp:
        print(f"| DCP async_save, caller blocked | {stats(dcp)} | {min(dcp) / floor:.2f} |")
    if during:
        ratio = statistics.median(during) / statistics.median(alone)
        print(f"| training step alone | {stats(alone)} | |")
        label = f"training step during a background write ({len(during)} steps)"
        print(f"| {label} | {stats(during)} | median {ratio:.2f}x alone |")


if __name__ == "__main__":
    main()
