"""Issue 10 part 6 on a CUDA machine: saves from GPU tensors and loads into a GPU model, against their anchors
and the raw floors, measured in one run (min / median of --repeat). Run it where a device is lent:

    python bench/bench_gpu.py [--gib 4] [--repeat 5] [--dir /tmp/tk-gpu]

Rows (seconds, and GB/s of the weights' bytes):
- floors: one pinned device-to-host copy of all the bytes, one pinned host-to-device copy, one write + fsync
  of the same bytes from host memory, one cold-free readinto of the file;
- save: torchkeep.save(model) of the CUDA model against torch.save(model.state_dict()) + fsync and
  safetensors.torch.save_file(state_dict) + fsync; peak host memory (VmHWM growth) of each, in a child
  process, against the weights' size;
- load: torchkeep.load_into(cuda_model, file) against model.load_state_dict(safetensors.torch.load_file(f,
  device="cuda")) and model.load_state_dict(torch.load(f, mmap=True, weights_only=True)), warm page cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

import safetensors.torch as st  # noqa: E402
from bench.bench_weights import fsync_path  # noqa: E402

import torchkeep  # noqa: E402


def model_of(gib: float, device: str) -> nn.Module:
    width = 4096
    layers = max(1, int(gib * (1 << 30)) // (width * width * 4))
    torch.manual_seed(0)
    with torch.device(device):
        return nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])


def timed(fn: Callable[[], Any], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - start)
    return out


def report(name: str, times: list[float], nbytes: int, anchor: list[float] | None = None) -> dict[str, Any]:
    row = {
        "row": name,
        "min_s": round(min(times), 4),
        "median_s": round(statistics.median(times), 4),
        "GB/s": round(nbytes / min(times) / 1e9, 2),
    }
    if anchor is not None:
        row["ratio_to_anchor"] = round(min(times) / min(anchor), 3)
    print(json.dumps(row), flush=True)
    return row


def child_peak(kind: str, gib: float, path: Path) -> int:
    """Host memory growth (VmHWM - VmRSS before) of one save in a fresh process, in bytes."""
    code = f"""
import os, sys, torch
sys.path.insert(0, {str(ROOT / "src")!r}); sys.path.insert(0, {str(ROOT)!r})
from bench.bench_gpu import model_of
import torchkeep, safetensors.torch as st
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
model = model_of({gib}, "cuda"); torch.cuda.synchronize()
before = status("VmRSS:")
if {kind!r} == "torchkeep":
    torchkeep.save(model, {str(path)!r})
elif {kind!r} == "torch":
    torch.save(model.state_dict(), {str(path)!r})
else:
    st.save_file(model.state_dict(), {str(path)!r})
print(status("VmHWM:") - before)
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


def floors(state: dict[str, torch.Tensor], nbytes: int, root: Path, repeat: int) -> tuple[list[float], ...]:
    """Pinned copies of all the bytes each way, and one write + fsync of them from host memory."""
    flat = torch.cat([t.reshape(-1) for t in state.values()])
    pinned = torch.empty_like(flat, device="cpu", pin_memory=True)
    d2h = timed(lambda: pinned.copy_(flat, non_blocking=True), repeat)
    h2d = timed(lambda: flat.copy_(pinned, non_blocking=True), repeat)
    report("floor: pinned device-to-host copy", d2h, nbytes)
    report("floor: pinned host-to-device copy", h2d, nbytes)
    raw = root / "raw.bin"

    def raw_write() -> None:
        with open(raw, "wb", buffering=0) as f:
            view = memoryview(pinned.numpy()).cast("B")
            while view.nbytes:
                view = view[f.write(view[: 1 << 30]) :]
            os.fsync(f.fileno())

    write_floor = timed(raw_write, repeat)
    report("floor: write + fsync of the bytes from host memory", write_floor, nbytes)
    raw.unlink()
    return d2h, h2d, write_floor


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=4.0)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", default="/tmp/tk-gpu")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "gib": args.gib}))

    model = model_of(args.gib, "cuda")
    state = model.state_dict()
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    _, h2d, write_floor = floors(state, nbytes, root, args.repeat)
    tk, pt, sf = root / "w.safetensors", root / "w.pt", root / "w_st.safetensors"
    ours = timed(lambda: torchkeep.save(model, tk), args.repeat)

    def torch_save() -> None:
        torch.save(model.state_dict(), pt)
        fsync_path(pt)

    def st_save() -> None:
        st.save_file(model.state_dict(), sf)
        fsync_path(sf)

    anchor_pt = timed(torch_save, args.repeat)
    anchor_st = timed(st_save, args.repeat)
    report("save: torchkeep.save(cuda model)", ours, nbytes, write_floor)
    report("save: torch.save(state_dict) + fsync", anchor_pt, nbytes, write_floor)
    report("save: safetensors save_file + fsync", anchor_st, nbytes, write_floor)
    for kind in ("torchkeep", "torch", "safetensors"):
        extra = child_peak(kind, args.gib, root / f"peak-{kind}.bin")
        print(json.dumps({"row": f"save peak host memory: {kind}", "bytes": extra, "of_weights": extra / nbytes}))

    fresh = model_of(args.gib, "cuda")
    load_ours = timed(lambda: torchkeep.load_into(fresh, tk), args.repeat)
    load_st = timed(lambda: fresh.load_state_dict(st.load_file(sf, device="cuda")), args.repeat)
    load_pt = timed(lambda: fresh.load_state_dict(torch.load(pt, mmap=True, weights_only=True)), args.repeat)
    report("load: torchkeep.load_into(cuda model), verified", load_ours, nbytes, h2d)
    report("load: lsd(safetensors.load_file(device=cuda))", load_st, nbytes, h2d)
    report("load: lsd(torch.load(mmap=True))", load_pt, nbytes, h2d)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
