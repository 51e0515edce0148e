"""A training run for the resume tests: run it whole, or stop (and be SIGKILLed) after a step, then resume.

python resume_script.py DIR OUT TOTAL OPTIMIZER [STOP_AT]
"""

from __future__ import annotations

import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchkeep


def build(optimizer_name: str) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    if optimizer_name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        scheduler: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.StepLR(opt, 5, 0.7)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.05)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    return model, opt, scheduler


def main(directory: str, out: str, total: int, optimizer_name: str, stop_at: int | None) -> None:
    g = torch.Generator().manual_seed(42)
    data = TensorDataset(torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g))
    model, opt, scheduler = build(optimizer_name)
    sampler = torchkeep.ResumableSampler(data, seed=1)
    # The loader's own generator: otherwise each new iterator draws a seed from the global RNG.
    loader = DataLoader(data, batch_size=8, sampler=sampler, generator=torch.Generator())
    mgr = torchkeep.CheckpointManager(directory, keep_last=2)
    objects = {"model": model, "optimizer": opt, "scheduler": scheduler, "components": {"sampler": sampler}}
    step, losses = 0, []
    if mgr.latest() is not None:
        state = mgr.restore(**objects)
        step, losses = state["step"], state["losses"]
    model.train()
    while step < total:
        for x, y in loader:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            scheduler.step()
            step += 1
            losses.append(loss.item())
            mgr.save(step, metrics={"loss": losses[-1]}, losses=losses, **objects)
            if step == stop_at:
                print("saved", step, flush=True)
                time.sleep(600)  # the test kills us here
            if step >= total:
                break
    torchkeep.save_checkpoint(out, model=model, optimizer=opt, scheduler=scheduler, rng=False, losses=losses)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]) if len(sys.argv) > 5 else None)
