"""Distributed save/load on 2 gloo ranks (CPU): torchkeep against plain torch.distributed.checkpoint.

    .venv/bin/python bench/bench_distributed.py [--mib 256] [--repeat 5] [--ranks 2]

An FSDP2 (``fully_shard``) MLP of about ``--mib`` MiB of float32 parameters, with AdamW state (3x the
parameters in all), saved and loaded alternately by:

- DCP: ``dcp.save({"model": ..., "optim": ...})`` of ``get_state_dict`` with ``FileSystemWriter(thread_count=
  IO_THREADS, sync_files=True)``; load: ``get_state_dict`` templates, ``dcp.load``, ``set_state_dict``.
- torchkeep: ``save_checkpoint(model=, optimizer=)`` (the same DCP write, plus every rank's RNG file, the
  checksum of every file and the manifest, committed by a rename); ``load_checkpoint`` (every file
  verified against its checksum first, the metadata read by torchkeep's checked reader).

Times are the slowest rank's, min / median of --repeat, and the ratios of the mins; the raw floor is one
write + fsync (and one read) of the same bytes per rank. Each save goes to a fresh folder, deleted after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torchkeep  # noqa: E402
from torchkeep import _config  # noqa: E402


def build(mib: int, world: int) -> tuple[nn.Module, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    width = 2048
    layers = max(1, mib * 1024 * 1024 // (4 * width * width))
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    return model, opt


def timed(fn: Any) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    elapsed = torch.tensor([time.perf_counter() - start])
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed.item())


def rank_main(rank: int, world: int, store: str, mib: int, repeat: int, workdir: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    model, opt = build(mib, world)
    local_bytes = sum(
        t.to_local().numel() * 4 if hasattr(t, "to_local") else t.numel() * t.element_size()
        for t in list(model.state_dict().values())
        + [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    )
    results: dict[str, list[float]] = {f"{n}_{op}": [] for n in ("raw", "dcp", "tk") for op in ("save", "load")}
    blob = torch.empty(local_bytes, dtype=torch.uint8).fill_(rank + 1)

    def raw_save(folder: Path) -> None:
        with open(folder / f"raw-{rank}", "wb") as f:
            f.write(memoryview(blob.numpy()))
            f.flush()
            os.fsync(f.fileno())

    def raw_load(folder: Path) -> None:
        into = torch.empty_like(blob)
        with open(folder / f"raw-{rank}", "rb", buffering=0) as f:
            f.readinto(memoryview(into.numpy()))

    def dcp_save(folder: Path) -> None:
        msd, osd = get_state_dict(model, opt)
        writer = dcp.FileSystemWriter(folder, thread_count=_config.IO_THREADS, sync_files=True)
        dcp.save({"model": msd, "optim": osd}, storage_writer=writer)

    def dcp_load(folder: Path) -> None:
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, storage_reader=dcp.FileSystemReader(folder))
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def tk_save(folder: Path) -> None:
        torchkeep.save_checkpoint(folder, model=model, optimizer=opt)

    def tk_load(folder: Path) -> None:
        torchkeep.load_checkpoint(folder, model=model, optimizer=opt)

    pairs = [("raw", raw_save, raw_load), ("dcp", dcp_save, dcp_load), ("tk", tk_save, tk_load)]
    for turn in range(repeat):
        for name, save, load in pairs[turn % 3 :] + pairs[: turn % 3]:  # no contender always runs after another
            folder = workdir / f"{name}-ckpt"
            if rank == 0 and name == "raw":
                folder.mkdir()
            dist.barrier()
            results[f"{name}_save"].append(timed(lambda folder=folder, save=save: save(folder)))
            results[f"{name}_load"].append(timed(lambda folder=folder, load=load: load(folder)))
            dist.barrier()
            if rank == 0:
                shutil.rmtree(folder)
    if rank == 0:
        total = local_bytes * world
        print(json.dumps({"bytes": total, "results": results}))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--store", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank is not None:
        rank_main(args.rank, args.ranks, args.store, args.mib, args.repeat, Path(args.workdir))
        return
    workdir = Path(tempfile.mkdtemp(prefix="tk-dist-bench-"))
    store = str(workdir / "store")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [sys.executable, __file__, "--mib", str(args.mib), "--repeat", str(args.repeat)]
    common += ["--ranks", str(args.ranks)]
    procs = [
        subprocess.Popen(
            [*common, "--rank", str(rank), "--store", store, "--workdir", str(workdir)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in range(args.ranks)
    ]
    outputs = [p.communicate()[0] for p in procs]
    shutil.rmtree(workdir, ignore_errors=True)
    if any(p.returncode for p in procs):
        raise SystemExit(f"a rank failed: {[p.returncode for p in procs]}")
    data = json.loads(outputs[0].strip().splitlines()[-1])
    results = data["results"]
    print(f"{args.ranks} ranks, {data['bytes'] / 2**20:.0f} MiB of state (parameters + AdamW), repeat {args.repeat}")
    print(f"{'':10} {'min s':>8} {'median s':>9} {'GB/s':>6} {'vs DCP':>7}")
    for op in ("save", "load"):
        base = min(results[f"dcp_{op}"])
        for name in ("raw", "dcp", "tk"):
            times = results[f"{name}_{op}"]
            label = {"raw": "raw floor", "dcp": "DCP", "tk": "torchkeep"}[name] + f" {op}"
            print(f"{label:14} {min(times):8.3f} {statistics.median(times):9.3f} "
                  f"{data['bytes'] / min(times) / 1e9:6.2f} {min(times) / base:7.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
