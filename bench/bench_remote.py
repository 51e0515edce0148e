"""Weights and training checkpoints to and from a local S3 server (moto's, on loopback): torchkeep against
fsspec + torch.save/torch.load.

    .venv/bin/python bench/bench_remote.py [--mib 256] [--repeat 5]

Both sides write the same state dict to the same server through s3fs; torch's side is the idiom a user
writes today (``with fs.open(url, "wb") as f: torch.save(sd, f)`` and ``torch.load(fs.open(url),
weights_only=True)``). min / median of --repeat, ratios of the mins. The server runs in this process
on one of the two cores, so absolute numbers are the server's as much as the client's.
"""

from __future__ import annotations

import argparse
import io
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torchkeep  # noqa: E402


def timed(fn: Callable[[], Any], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def mm(values: list[float]) -> str:
    return f"{min(values):.3f} / {statistics.median(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s"
    ).create_bucket(Bucket="bench")
    options = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": endpoint}, "skip_instance_cache": True}
    fs = s3fs.S3FileSystem(**options)
    width = 2048
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(max(1, args.mib // 16))])
    state = model.state_dict()
    print(f"{sum(t.numel() * 4 for t in state.values()) / 2**20:.0f} MiB in {len(state)} tensors, {endpoint}")

    def tk_save() -> None:
        torchkeep.save(state, "s3://bench/tk/model.safetensors", storage_options=options)

    def torch_save() -> None:
        with fs.open("s3://bench/torch/model.pt", "wb") as f:
            torch.save(state, f)

    def tk_load() -> None:
        torchkeep.load("s3://bench/tk/model.safetensors", storage_options=options)

    def torch_load() -> None:
        with fs.open("s3://bench/torch/model.pt", "rb") as f:
            torch.load(io.BytesIO(f.read()), weights_only=True)

    # A training checkpoint: the model, AdamW's state (3x the weights in all) and plain values.
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, width)).sum().backward()
    opt.step()

    def tk_ckpt_save() -> None:
        torchkeep.save_checkpoint("s3://bench/tk/ckpt", model=model, optimizer=opt, epoch=3, storage_options=options)

    def torch_ckpt_save() -> None:
        with fs.open("s3://bench/torch/ckpt.pt", "wb") as f:
            state = {"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(), "epoch": 3}
            torch.save(state, f)

    def tk_ckpt_load() -> None:
        torchkeep.load_checkpoint("s3://bench/tk/ckpt", model=model, optimizer=opt, storage_options=options)

    def torch_ckpt_load() -> None:
        with fs.open("s3://bench/torch/ckpt.pt", "rb") as f:
            saved = torch.load(io.BytesIO(f.read()), weights_only=True)
        model.load_state_dict(saved["model_state_dict"])
        opt.load_state_dict(saved["optimizer_state_dict"])

    rows = []
    cases = (
        ("weights save", tk_save, torch_save),
        ("weights load", tk_load, torch_load),
        ("checkpoint save", tk_ckpt_save, torch_ckpt_save),
        ("checkpoint load", tk_ckpt_load, torch_ckpt_load),
    )
    for label, ours, theirs in cases:
        a, b = timed(ours, args.repeat), timed(theirs, args.repeat)
        rows.append((label, mm(a), mm(b), min(a) / min(b)))
    server.stop()
    print("| operation | torchkeep (min / median s) | fsspec + torch (min / median s) | ratio |")
    print("|---|---|---|---|")
    for label, a, b, ratio in rows:
        print(f"| {label} | {a} | {b} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
