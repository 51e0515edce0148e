"""What each way of saving does when the disk fills up, or turns read-only, mid-save: is the previous save still there?

    .venv/bin/python bench/fault_compare.py          # needs root (mounts a small tmpfs)

For each writer, on a real 64 MiB tmpfs: save a small file, fill the disk but for 1 MiB (or remount
the tmpfs read-only), then save a 4 MiB state over it. Reported: what the second save raised, and
whether the first save is still readable bit for bit afterwards (and whether debris was left on the disk).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torchkeep  # noqa: E402

MiB = 1 << 20


def fill(disk: Path, leave: int) -> None:
    stat = os.statvfs(disk)
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(stat.f_bavail * stat.f_frsize - leave, 0))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def read_only(disk: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)


def scenario(
    disk: Path,
    save: Callable[[dict[str, torch.Tensor], Path], None],
    load: Callable[[Path], dict[str, torch.Tensor]],
    fault: Callable[[Path], None],
) -> tuple[str, str, str]:
    target = disk / "target"
    small = {"w": torch.arange(16.0)}
    save(small, target)
    fault(disk)
    big = {"w": torch.randn(MiB)}  # 4 MiB
    try:
        save(big, target)
        raised = "nothing (returned normally)"
    except Exception as exc:  # what each tool raises is the measurement
        raised = type(exc).__name__
    try:
        kept = "yes" if same(small, load(target)) else "no: different contents"
    except Exception as exc:
        kept = f"no: {type(exc).__name__}"
    leftovers = sorted(p.name for p in disk.iterdir() if p.name != "filler" and not p.name.startswith("target"))
    return raised, kept, ", ".join(leftovers) or "none"


def checkpoint_idiom_save(state: dict[str, torch.Tensor], target: Path) -> None:
    # The tutorials' save_checkpoint(state, is_best): torch.save straight onto the file name.
    torch.save({"epoch": 1, "model_state_dict": state}, target)


def main() -> int:
    model = nn.Linear(2, 2)  # noqa: F841 - torch initialised before timing-free runs
    writers: dict[str, tuple[Callable[..., None], Callable[[Path], dict[str, torch.Tensor]]]] = {
        "torchkeep.save": (lambda s, p: torchkeep.save(s, p.with_suffix(".safetensors")),
                           lambda p: torchkeep.load(p.with_suffix(".safetensors"))),
        "torchkeep.save_checkpoint": (lambda s, p: torchkeep.save_checkpoint(p, weights=s),
                                      lambda p: torchkeep.load_checkpoint(p)["weights"]),
        "torch.save": (lambda s, p: torch.save(s, p), lambda p: torch.load(p, weights_only=True)),
        "torch.save checkpoint idiom": (checkpoint_idiom_save,
                                        lambda p: torch.load(p, weights_only=True)["model_state_dict"]),
        "safetensors save_file": (lambda s, p: save_file(s, str(p)), lambda p: load_file(str(p))),
    }  # fmt: skip
    faults: dict[str, Callable[[Path], None]] = {"disk full": lambda d: fill(d, leave=MiB), "read-only": read_only}
    print("| fault | writer | second save raised | first save intact | debris left |")
    print("|---|---|---|---|---|")
    for fault, make_fault in faults.items():
        for name, (save, load) in writers.items():
            with tempfile.TemporaryDirectory() as tmp:
                disk = Path(tmp)
                if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", tmp], check=False).returncode:
                    print("cannot mount a tmpfs (needs root)")
                    return 1
                try:
                    raised, kept, debris = scenario(disk, save, load, make_fault)
                finally:
                    subprocess.run(["umount", "-l", tmp], check=False)
            print(f"| {fault} | {name} | {raised} | {kept} | {debris} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
