"""Sharded saves with one writer thread against two (torchkeep._config.IO_THREADS), same run, min / median of 4.

.venv/bin/python bench/bench_shards.py
"""

import shutil
import statistics
import time

import torch
from torch import nn

import torchkeep
from torchkeep import _config

torch.set_num_threads(1)
model = nn.Sequential(*[nn.Linear(4096, 4096, bias=False) for _ in range(24)])  # 1.5 GiB


def run(threads: int) -> str:
    _config.IO_THREADS = threads
    xs = []
    for _ in range(4):
        shutil.rmtree("/var/tmp/shards", ignore_errors=True)
        start = time.perf_counter()
        torchkeep.save(model, "/var/tmp/shards", max_shard_size="256MB")
        xs.append(time.perf_counter() - start)
    return f"{min(xs):.3f} / {statistics.median(xs):.3f}"


for threads in (1, 2, 1, 2):
    print(f"{threads} thread(s): {run(threads)} s")
