"""``torchkeep demo --distributed``: the Iris classifier on 2 gloo ranks (CPU) with FSDP2.

Train with a manager, kill a rank (SIGKILL) mid-run, restart both ranks from the latest checkpoint
and finish bit-identical to a run that was never interrupted, then reshard to one process (no process
group) and consolidate the weights into one safetensors file. ``--storage s3`` also publishes those
weights to a local S3 server (moto's, started and stopped here) and reads them back.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

import torchkeep
from torchkeep.cli.demo import IrisNet, accuracy, iris_data

RANKS = 2
TOTAL_STEPS = 60
SAVE_EVERY = 10
KILL_AT = 35  # rank 1 dies here: after step 30 was saved, mid-epoch
BATCH = 8  # per rank


def _rank_main(rank: int, store: str, run_dir: str, kill: bool, report: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=RANKS)
    try:
        _train(rank, run_dir, kill, report)
    except (RuntimeError, torchkeep.TorchkeepError) as exc:  # a lost peer: say so in one line
        print(f"   rank {rank} stopped: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}", flush=True)
        os._exit(2)


def _train(rank: int, run_dir: str, kill: bool, report: str) -> None:
    """One rank's training: restore the latest checkpoint if any, train to TOTAL_STEPS, save every SAVE_EVERY."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    x_train, y_train, _, _ = iris_data()
    torch.manual_seed(0)
    model = IrisNet()
    mesh = init_device_mesh("cpu", (RANKS,))
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    sampler = torchkeep.ResumableSampler(len(x_train), seed=1)  # one global position across the ranks
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=BATCH, sampler=sampler)
    mgr = torchkeep.CheckpointManager(run_dir, keep_last=2)
    state = mgr.restore(model=model, optimizer=optimizer, components={"sampler": sampler}) if mgr.latest() else {}
    step = state.get("step", 0)
    if rank == 0 and step:
        print(f"   ranks restored step {step} (each its own RNG; the sampler's global position)", flush=True)
    batches = iter(loader)
    loss_fn = torch.nn.CrossEntropyLoss()
    while step < TOTAL_STEPS:
        try:
            x, y = next(batches)
        except StopIteration:  # the sampler moved to the next epoch
            batches = iter(loader)
            continue
        step += 1
        if kill and rank == 1 and step == KILL_AT:
            print(f"   rank 1: SIGKILL at step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        if step % SAVE_EVERY == 0:
            mgr.save(step, model=model, optimizer=optimizer, components={"sampler": sampler})
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}
    if rank == 0:
        torchkeep.save(full, report)
    mgr.close()
    dist.barrier()
    dist.destroy_process_group()


def _launch(run_dir: Path, work: Path, *, kill: bool, name: str) -> list[int]:
    store = work / f"store-{name}"
    code = "import sys; from torchkeep.cli.demo_distributed import _rank_main as m; m(int(sys.argv[1]), *sys.argv[2:4], sys.argv[4] == '1', sys.argv[5])"  # noqa: E501
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                code,
                str(rank),
                str(store),
                str(run_dir),
                "1" if kill else "0",
                str(work / f"{name}.safetensors"),
            ],
            env=env,
        )
        for rank in range(RANKS)
    ]
    return [p.wait(timeout=300) for p in procs]


def run(out_dir: str | Path = "torchkeep-demo-distributed", storage: str = "local") -> int:
    """Run the distributed demo under ``out_dir``; returns a process exit code."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="launch-", dir=out))
    ok = True

    print(f"== 1. reference: {RANKS} gloo ranks, FSDP2 (fully_shard), {TOTAL_STEPS} steps, never interrupted")
    ok &= _launch(out / "reference-run", work, kill=False, name="reference") == [0, 0]

    print(f"\n== 2. the same run, checkpointed every {SAVE_EVERY} steps; rank 1 is killed at step {KILL_AT}")
    codes = _launch(out / "run", work, kill=True, name="killed")
    print(f"   exit codes {codes}: rank 1 killed, rank 0 stopped by the lost peer")
    latest = (out / "run" / "latest").read_text().strip()
    listing = sorted(p.name for p in (out / "run").iterdir())
    print(f"   latest is still {latest}; nothing half-written is visible: {listing}")

    print("\n== 3. restart both ranks: resume from the latest checkpoint and finish")
    ok &= _launch(out / "run", work, kill=False, name="resumed") == [0, 0]
    reference = torchkeep.load(work / "reference.safetensors")
    resumed = torchkeep.load(work / "resumed.safetensors")
    same = reference.keys() == resumed.keys() and all(torch.equal(reference[k], resumed[k]) for k in reference)
    print(f"   final weights bit-identical to the uninterrupted run: {same}")
    ok &= same

    print("\n== 4. reshard to 1 process (no process group): inference and one safetensors file")
    final = out / "run" / (out / "run" / "latest").read_text().strip()
    model = IrisNet()
    torchkeep.load_checkpoint(final, model=model, rng=False)
    model.eval()
    _, _, x_test, y_test = iris_data()
    print(f"   test accuracy of the 2-rank checkpoint in one process: {accuracy(model, x_test, y_test):.3f}")
    report = torchkeep.consolidate(final, out / "iris-fsdp.safetensors")
    print(f"   {report}")
    ok &= all(torch.equal(model.state_dict()[k], v) for k, v in torchkeep.load(out / "iris-fsdp.safetensors").items())

    if storage == "s3":
        ok &= _s3_roundtrip(out / "iris-fsdp.safetensors")
    print(f"\ndistributed demo {'OK' if ok else 'FAILED'}; files are under {out}/")
    return 0 if ok else 1


def _s3_roundtrip(weights: Path) -> bool:
    """Publish the consolidated weights to a local S3 server and read them back, verified."""
    try:
        import boto3  # type: ignore[import-untyped]
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        raise ImportError("--storage s3 needs moto and s3fs: pip install 'moto[server]' s3fs") from exc
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server's log of every request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        keys: dict[str, Any] = {"aws_access_key_id": "demo", "aws_secret_access_key": "demo"}
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **keys).create_bucket(Bucket="demo")
        opts = {"key": "demo", "secret": "demo", "client_kwargs": {"endpoint_url": endpoint},
                "skip_instance_cache": True}  # fmt: skip
        url = "s3://demo/iris/model.safetensors"
        print(f"\n== 5. object storage: {url} on a local S3 server ({endpoint})")
        local = torchkeep.load(weights)
        torchkeep.save(local, url, storage_options=opts)
        back = torchkeep.load(url, storage_options=opts)
        same = local.keys() == back.keys() and all(torch.equal(local[k], back[k]) for k in local)
        size = torchkeep.inspect(url, storage_options=opts).total_bytes
        print(f"   written whole, read back and verified: {same} ({size} bytes of tensors)")
        return same
    finally:
        server.stop()
