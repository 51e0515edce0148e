"""Sharded folders (1.5 GiB in 256 MB shards): saves and loads with one thread against two, same run, min / median.

.venv/bin/python bench/bench_shards.py [--repeat 4]

- save: torchkeep.save(model, folder, max_shard_size="256MB") with IO_THREADS 1 and 2;
- load: torchkeep.load(folder) (mapped, every checksum verified, one element per page touched) and
  torchkeep.load_into(model, folder), with one thread for reading, hashing and copying against two, warm page
  cache, and cold (page cache dropped before each try; needs root); the anchor is safetensors.load_file of every
  shard with the same touch (it verifies nothing).
"""

import argparse
import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import safetensors.torch as st
import torch
from torch import nn

import torchkeep
from torchkeep import _config

FOLDER = Path("/var/tmp/shards")


def threads(count: int) -> None:
    _config.IO_THREADS = _config.HASH_THREADS = _config.COPY_THREADS = count


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def timed(fn: Callable[[], object], repeat: int, before: Callable[[], None] | None = None) -> str:
    xs = []
    for _ in range(repeat):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        xs.append(time.perf_counter() - start)
    return f"{min(xs):.3f} / {statistics.median(xs):.3f}"


def touch(state: dict[str, torch.Tensor]) -> None:
    for v in state.values():
        v.view(-1)[::1024].sum()  # one element per 4 KiB page


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=4)
    repeat = parser.parse_args().repeat
    torch.set_num_threads(1)
    model = nn.Sequential(*[nn.Linear(4096, 4096, bias=False) for _ in range(24)])  # 1.5 GiB

    def save() -> None:
        shutil.rmtree(FOLDER, ignore_errors=True)
        torchkeep.save(model, FOLDER, max_shard_size="256MB")

    for count in (1, 2, 1, 2):
        threads(count)
        print(f"save, {count} thread(s): {timed(save, repeat)} s", flush=True)
    shards = sorted(FOLDER.glob("*.safetensors"))
    cold = os.geteuid() == 0
    for count in (1, 2, 1, 2):
        threads(count)
        print(f"load, {count} thread(s), warm: {timed(lambda: touch(torchkeep.load(FOLDER)), repeat)} s", flush=True)
        print(f"load_into, {count} thread(s), warm: {timed(lambda: torchkeep.load_into(model, FOLDER), repeat)} s")
        if cold:
            print(
                f"load, {count} thread(s), cold: {timed(lambda: touch(torchkeep.load(FOLDER)), repeat, drop_caches)} s"
            )
            into = timed(lambda: torchkeep.load_into(model, FOLDER), repeat, drop_caches)
            print(f"load_into, {count} thread(s), cold: {into} s", flush=True)
    anchor = timed(lambda: [touch(st.load_file(s)) for s in shards], repeat)
    print(f"anchor: safetensors.load_file of every shard, warm: {anchor} s")
    if cold:
        anchor = timed(lambda: [touch(st.load_file(s)) for s in shards], repeat, drop_caches)
        print(f"anchor: safetensors.load_file of every shard, cold: {anchor} s")
    shutil.rmtree(FOLDER, ignore_errors=True)


if __name__ == "__main__":
    main()
