"""Benchmark CheckpointManager.save against the tutorials' torch.save idiom and the raw floor.

    .venv/bin/python bench/bench_checkpoint.py [--repeats 3] [--dir /var/tmp/tkbench-ckpt]

A ~100M-parameter model with AdamW state (so ~3x that in moments): the same state saved by
``mgr.save`` (atomic directory, checksums, fsync) and by
``torch.save({'epoch', 'model_state_dict', 'optimizer_state_dict', 'loss'}) + fsync``, and the
same bytes written raw with one fsync. Median and min of the repeats, as ratios to the raw floor.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import torchkeep


def build() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(2048, 4096) if i % 2 == 0 else nn.Linear(4096, 2048) for i in range(12)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    for p in model.parameters():
        p.grad = None
    return model, opt


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default="/var/tmp/tkbench-ckpt")
    args = parser.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    model, opt = build()
    params = sum(p.numel() for p in model.parameters())
    tensors = list(model.state_dict().values()) + [
        t for s in opt.state_dict()["state"].values() for t in s.values() if isinstance(t, torch.Tensor)
    ]
    raw = torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors]).numpy()
    print(f"{params / 1e6:.1f}M parameters, {raw.nbytes / 1e9:.2f} GB of model + optimizer state")

    def raw_write() -> None:
        with open(root / "raw.bin", "wb", buffering=0) as f:
            f.write(memoryview(raw))
            os.fsync(f.fileno())

    def torch_idiom(step: int) -> None:
        path = root / "checkpoint.pth"
        torch.save(
            {"epoch": step, "model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(),
             "loss": torch.tensor(0.5)},
            path,
        )  # fmt: skip
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)

    mgr = torchkeep.CheckpointManager(root / "run", keep_last=1)

    def manager_save(step: int) -> None:
        mgr.save(step, model=model, optimizer=opt, epoch=step, loss=torch.tensor(0.5))

    results: dict[str, list[float]] = {"raw write + fsync": [], "torch.save idiom + fsync": [], "mgr.save": []}
    for step in range(args.repeats):
        for name in results:
            gc.collect()
            os.sync()  # start each measurement with no writeback pending from the previous one
            start = time.perf_counter()
            if name == "raw write + fsync":
                raw_write()
            elif name == "mgr.save":
                manager_save(step)
            else:
                torch_idiom(step)
            results[name].append(time.perf_counter() - start)
        mgr.wait()  # background deletion of the retired checkpoint, outside the timings
        results = dict(reversed(list(results.items())))  # alternate the order between repeats
    results = {k: results[k] for k in ("raw write + fsync", "torch.save idiom + fsync", "mgr.save")}
    floor = statistics.median(results["raw write + fsync"])
    print("| method | min (s) | median (s) | median / raw |")
    print("|---|---|---|---|")
    for name, times in results.items():
        print(
            f"| {name} | {min(times):.3f} | {statistics.median(times):.3f} | {statistics.median(times) / floor:.2f} |"
        )
    mgr.close()
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
