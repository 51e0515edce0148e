"""One rank of a distributed test scenario: ``ranks.py SCENARIO RANK WORLD STORE WORKDIR``.

Each scenario runs several checks in one launch (a launch costs seconds) and writes what it saw to
``report-<scenario>-<rank>.json``; the test asserts on the reports.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import torchkeep
from torchkeep import _config


class Counter:
    """A per-rank object with state_dict()/load_state_dict()."""

    def __init__(self, n: int) -> None:
        self.n = n

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n = state["n"]


class Context:
    def __init__(self, rank: int, world: int, workdir: Path) -> None:
        self.rank, self.world, self.workdir = rank, world, workdir
        self.report: dict[str, Any] = {}

    def fails(self, fn: Callable[[], Any]) -> dict[str, Any]:
        """Run ``fn``, which must raise; what it raised, for the report."""
        try:
            fn()
        except Exception as exc:
            return {"type": type(exc).__name__, "message": str(exc), "ranks": list(getattr(exc, "ranks", ()))}
        return {"type": None}


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))


def train_step(model: nn.Module, opt: Any, sched: Any = None) -> float:
    x, y = torch.randn(4, 6), torch.randn(4, 1)  # from this rank's generator
    loss = ((model(x) - y) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    if sched is not None:
        sched.step()
    return float(loss.item())


def sharded_mlp(world: int, *, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The MLP with every Linear and the whole model under FSDP2 (``fully_shard``) on a CPU mesh, and AdamW."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(seed)
    model = mlp()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        value = p.full_tensor() if isinstance(p, DTensor) else p
        out[name.removeprefix("module.")] = value.detach().clone()
    return out


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def raw_dcp(ctx: Context, model: nn.Module, opt: Any, name: str) -> None:
    """A plain DCP checkpoint as users write it today (get_state_dict + dcp.save), and its full parameters,
    for the one-process comparison with dcp_to_torch_save."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(ctx.workdir / name))
    params = full_params(model)  # a collective on FSDP2: every rank takes part
    if ctx.rank == 0:
        torchkeep.save(params, ctx.workdir / f"{name}-params.safetensors")


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


# -- scenarios ----------------------------------------------------------------------------------


def ddp(ctx: Context) -> None:
    """Replicated model: bit-exact resume with per-rank RNG and state; one failing rank fails all."""
    from torch.nn.parallel import DistributedDataParallel

    rank = ctx.rank
    torch.manual_seed(0)
    model = DistributedDataParallel(mlp())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    torch.manual_seed(100 + rank)  # each rank draws its own batches
    for _ in range(3):
        train_step(model, opt, sched)
    counter = Counter(10 + rank)
    ckpt = ctx.workdir / "ddp-ckpt"
    torchkeep.save_checkpoint(
        ckpt, model=model, optimizer=opt, scheduler=sched, per_rank={"counter": counter, "seen": 7 + rank}, epoch=1
    )
    expected = [train_step(model, opt, sched) for _ in range(2)]
    expected_params = full_params(model)
    counter.n = -1
    state = torchkeep.load_checkpoint(ckpt, model=model, optimizer=opt, scheduler=sched, per_rank={"counter": counter})
    again = [train_step(model, opt, sched) for _ in range(2)]
    ctx.report.update(
        resumed_losses_equal=expected == again,
        resumed_params_equal=same(expected_params, full_params(model)),
        state={k: v for k, v in state.items()},
        counter=counter.n,
        files=sorted(p.name for p in ckpt.iterdir()),
    )
    manifest = json.loads((ckpt / "manifest.json").read_text())
    ctx.report["manifest"] = {"version": manifest["version"], "world_size": manifest["distributed"]["world_size"]}

    # save_checkpoint(blocking=False): copied now, written in the background.
    at_save = full_params(model)
    pending = torchkeep.save_checkpoint(ctx.workdir / "ddp-async", model=model, optimizer=opt, blocking=False)
    train_step(model, opt, sched)
    pending.wait()
    torchkeep.load_checkpoint(ctx.workdir / "ddp-async", model=model, optimizer=opt)
    ctx.report["async_restored"] = same(at_save, full_params(model))
    # One rank's state cannot be stored: every rank fails, naming it; nothing is committed.
    bad = ctx.workdir / "ddp-bad"
    ctx.report["bad_value"] = ctx.fails(
        lambda: torchkeep.save_checkpoint(bad, model=model, per_rank={"x": object()} if rank == 1 else {})
    )
    ctx.report["bad_exists"] = bad.exists()
    # Ranks told different paths.
    ctx.report["different_paths"] = ctx.fails(
        lambda: torchkeep.save_checkpoint(ctx.workdir / f"ddp-rank{rank}", model=model)
    )
    dist.barrier()
    ctx.report["temporaries"] = temporaries(ctx.workdir)
    # A model that does not fit: every rank raises the typed error, and the model is unchanged.
    before = full_params(model)
    other = DistributedDataParallel(nn.Sequential(nn.Linear(6, 3)))
    ctx.report["mismatch"] = ctx.fails(lambda: torchkeep.load_checkpoint(ckpt, model=other))
    ctx.report["unchanged_after_mismatch"] = same(before, full_params(model))
    raw_dcp(ctx, model, opt, "ddp-raw-dcp")


def fsdp(ctx: Context) -> None:
    """FSDP2: bit-exact resume; the batches and parameters of one more step, for the 2->1 check."""

    rank = ctx.rank
    model, opt = sharded_mlp(ctx.world, seed=0)
    torch.manual_seed(100 + rank)
    for _ in range(3):
        train_step(model, opt)
    ckpt = ctx.workdir / "fsdp-ckpt"
    torchkeep.save_checkpoint(ckpt, model=model, optimizer=opt, per_rank={"seen": 12 + rank}, step=3)
    # the next step, recorded for a single-process reference: this rank's batch and the parameters after
    state = torch.get_rng_state()
    batch = (torch.randn(4, 6), torch.randn(4, 1))
    torch.set_rng_state(state)
    expected = [train_step(model, opt)]
    if rank == 0:
        torchkeep.save(full_params(model), ctx.workdir / "fsdp-after1.safetensors")
    else:
        full_params(model)  # a collective: every rank takes part
    expected.append(train_step(model, opt))
    after = full_params(model)
    torchkeep.save({"x": batch[0], "y": batch[1]}, ctx.workdir / f"fsdp-batch-{rank}.safetensors")
    returned = torchkeep.load_checkpoint(ckpt, model=model, optimizer=opt)
    again = [train_step(model, opt) for _ in range(2)]
    ctx.report.update(
        resumed_losses_equal=expected == again,
        resumed_params_equal=same(after, full_params(model)),
        seen=returned.get("seen"),
        files=sorted(p.name for p in ckpt.iterdir()),
    )
    # Async: save() returns once the shards are copied; training goes on while the ranks write on
    # their background group; the checkpoint holds the state at save time.
    mgr = torchkeep.CheckpointManager(ctx.workdir / "fsdp-async", async_save=True)
    at_save = full_params(model)
    pending = mgr.save(1, model=model, optimizer=opt)
    ctx.report["async_handle"] = type(pending).__name__
    train_step(model, opt)  # changes the live shards while the save may be in flight
    info = pending.wait()
    changed = not same(at_save, full_params(model))
    mgr.restore(model=model, optimizer=opt)
    ctx.report.update(
        async_latest=info.is_latest, async_changed=changed, async_restored=same(at_save, full_params(model))
    )
    mgr.close()
    raw_dcp(ctx, model, opt, "fsdp-raw-dcp")


def fsdp_save4(ctx: Context) -> None:
    """4 ranks save an FSDP2 checkpoint and the full state it holds, for a 2-rank load."""
    fsdp_train_and_save(ctx, "fsdp4-ckpt")


def fsdp_load2(ctx: Context) -> None:
    """2 ranks restore what 4 saved: the same full tensors; per-rank state refused; RNG re-derived."""

    model, opt = sharded_mlp(ctx.world, seed=1)  # other initial values: the load must replace them all
    ckpt = ctx.workdir / "fsdp4-ckpt"
    ctx.report["per_rank_refused"] = ctx.fails(
        lambda: torchkeep.load_checkpoint(ckpt, model=model, optimizer=opt, per_rank={"c": Counter(0)})
    )
    state = torchkeep.load_checkpoint(ckpt, model=model, optimizer=opt)
    reference = torchkeep.load(ctx.workdir / "fsdp4-full.safetensors")
    ctx.report["params_equal"] = same({k: v for k, v in reference.items() if "exp_avg" not in k}, full_params(model))
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full_opt = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    ctx.report["exp_avg_equal"] = all(
        torch.equal(full_opt["state"][k]["exp_avg"], reference[f"exp_avg.{k}"]) for k in full_params(model)
    )
    ctx.report["state_keys"] = sorted(state)
    ctx.report["draw"] = torch.rand(1).item()
    # A shard file gone: found by the rank that checks it, an error on both ranks, before anything loads.
    if ctx.rank == 0:
        import shutil

        shutil.copytree(ckpt, ctx.workdir / "fsdp4-missing", dirs_exist_ok=True)
        (ctx.workdir / "fsdp4-missing" / "__3_0.distcp").unlink()
    dist.barrier()
    before = full_params(model)
    ctx.report["missing_shard"] = ctx.fails(
        lambda: torchkeep.load_checkpoint(ctx.workdir / "fsdp4-missing", model=model, optimizer=opt)
    )
    ctx.report["unchanged_after_missing"] = same(before, full_params(model))
    # Weights converted offline (convert --sharded, one process) load into the sharded model, each rank its part.
    torchkeep.load_checkpoint(ctx.workdir / "from-weights", model=model, rng=False)
    ctx.report["from_weights_equal"] = same(torchkeep.load(ctx.workdir / "weights.safetensors"), full_params(model))


def fsdp_train_and_save(ctx: Context, name: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    model, opt = sharded_mlp(ctx.world, seed=0)
    torch.manual_seed(100 + ctx.rank)
    for _ in range(2):
        train_step(model, opt)
    torchkeep.save_checkpoint(ctx.workdir / name, model=model, optimizer=opt, per_rank={"seen": ctx.rank}, step=2)
    params = full_params(model)
    full_opt = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    if ctx.rank == 0:
        exp_avg = {f"exp_avg.{k}": full_opt["state"][k]["exp_avg"] for k in params}
        torchkeep.save({**params, **exp_avg}, ctx.workdir / "fsdp4-full.safetensors")


def manager_kill(ctx: Context) -> None:
    """A manager on 2 ranks saves steps 1 and 2; rank 1 is killed (SIGKILL) while writing step 3."""
    import signal

    from torch.nn.parallel import DistributedDataParallel

    import torchkeep.distributed.save as distributed_save

    rank = ctx.rank
    torch.manual_seed(0)
    model = DistributedDataParallel(mlp())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(100 + rank)
    run = ctx.workdir / "run"
    mgr = torchkeep.CheckpointManager(run, keep_last=2)
    for step in (1, 2):
        train_step(model, opt)
        mgr.save(step, model=model, optimizer=opt, per_rank={"seen": 10 * step + rank}, metrics={"loss": 1.0 / step})
    if rank == 0:
        torchkeep.save(full_params(model), ctx.workdir / "run-step2.safetensors")
    draw = torch.rand(3).tolist()  # this rank's generator just after step 2, kept where a killed rank leaves it
    (ctx.workdir / f"draw-after-step2-{rank}.json").write_text(json.dumps(draw))
    train_step(model, opt)
    if rank == 1:
        write = distributed_save.write_weights

        def write_then_die(*args: Any, **kwargs: Any) -> int:
            write(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
            return 0

        distributed_save.write_weights = write_then_die  # type: ignore[assignment]
    ctx.report["third"] = ctx.fails(lambda: mgr.save(3, model=model, optimizer=opt))
    ctx.report["latest"] = (run / "latest").read_text().strip()
    ctx.report["steps"] = sorted(p.name for p in run.iterdir() if p.name.startswith("step-"))
    ctx.report["temporaries"] = temporaries(run)


def manager_resume(ctx: Context) -> None:
    """After the kill: every rank restores step 2 exactly, then the run goes on and retention retires step 1."""
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(5)  # other initial values: the restore must replace them
    model = DistributedDataParallel(mlp())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    run = ctx.workdir / "run"
    mgr = torchkeep.CheckpointManager(run, keep_last=2)
    state = mgr.restore(model=model, optimizer=opt)
    reference = torchkeep.load(ctx.workdir / "run-step2.safetensors")
    ctx.report.update(
        step=state["step"],
        seen=state["seen"],
        params_equal=same(reference, full_params(model)),
        draw=torch.rand(3).tolist(),  # this rank's generator, as it was at step 2
    )
    train_step(model, opt)
    info = mgr.save(3, model=model, optimizer=opt)
    ctx.report["saved"] = {"step": info.step, "latest": info.is_latest}
    dist.barrier()
    mgr.wait()
    ctx.report["steps"] = sorted(p.name for p in run.iterdir() if p.name.startswith("step-"))
    ctx.report["latest"] = (run / "latest").read_text().strip()
    mgr.close()
    # Incremental across ranks: rank 0 stores each large shared tensor once, by content.
    frozen = torch.ones(64 * 1024)  # 256 KiB: an object; the same at steps 1 and 2, another at step 3
    with torchkeep.CheckpointManager(ctx.workdir / "run-inc", incremental=True, keep_last=1) as inc:
        inc.save(1, model=model, frozen=frozen)
        inc.save(2, model=model, frozen=frozen)
        objects_at_2 = sorted(p.name for p in (ctx.workdir / "run-inc" / "objects").iterdir())
        inc.save(3, model=model, frozen=frozen * 2)
        inc.wait()
        state = inc.restore(model=model)
    objects_at_3 = sorted(p.name for p in (ctx.workdir / "run-inc" / "objects").iterdir())
    ctx.report["incremental"] = {
        "objects": [len(objects_at_2), len(objects_at_3)],
        "changed": objects_at_2 != objects_at_3,
        "restored": bool(torch.equal(state["frozen"], frozen * 2)),
    }


def s3_fsdp(ctx: Context) -> None:
    """FSDP2 on 2 ranks saving to and loading from S3 (a server the test started): every rank writes its own
    objects, rank 0 the manifest last; a second save to the same URL replaces the first whole."""
    options = json.loads(os.environ["TORCHKEEP_TEST_S3"])
    url = "s3://torchkeep-bucket/dist/ckpt"
    model, opt = sharded_mlp(ctx.world, seed=0)
    torch.manual_seed(100 + ctx.rank)
    train_step(model, opt)
    torchkeep.save_checkpoint(url, model=model, optimizer=opt, per_rank={"seen": ctx.rank}, storage_options=options)
    expected = [train_step(model, opt) for _ in range(2)]
    after = full_params(model)
    state = torchkeep.load_checkpoint(url, model=model, optimizer=opt, storage_options=options)
    again = [train_step(model, opt) for _ in range(2)]
    ctx.report.update(resumed=expected == again and same(after, full_params(model)), seen=state.get("seen"))
    from torchkeep.storage.remote import RemoteStorage

    dist.barrier()
    first = RemoteStorage(url, options).list()
    torchkeep.save_checkpoint(url, model=model, optimizer=opt, storage_options=options)
    dist.barrier()
    ctx.report.update(first=first, second=RemoteStorage(url, options).list())


def s3_manager(ctx: Context) -> None:
    """A manager shared by 2 ranks on S3: rank 0 holds the lock object, commits, moves latest, retires."""
    from torch.nn.parallel import DistributedDataParallel

    options = json.loads(os.environ["TORCHKEEP_TEST_S3"])
    url = "s3://torchkeep-bucket/dist/run"
    torch.manual_seed(0)
    model = DistributedDataParallel(mlp())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(100 + ctx.rank)
    mgr = torchkeep.CheckpointManager(url, keep_last=2, storage_options=options)
    for step in (1, 2, 3):
        train_step(model, opt)
        info = mgr.save(step, model=model, optimizer=opt, per_rank={"seen": 10 * step + ctx.rank})
    at_3 = full_params(model)
    draw = torch.rand(2).tolist()
    train_step(model, opt)
    state = mgr.restore(model=model, optimizer=opt)
    ctx.report.update(
        latest=info.is_latest,
        steps=[i.step for i in mgr.list()],
        state=state,
        restored=same(at_3, full_params(model)),
        draw_again=torch.rand(2).tolist() == draw,
    )
    # In the background: copied at save(), uploaded by both ranks on their own group while training goes on.
    mgr.async_save = True
    train_step(model, opt)
    at_4 = full_params(model)
    pending = mgr.save(4, model=model, optimizer=opt)
    train_step(model, opt)
    ctx.report["async_info"] = {"step": pending.wait().step, "handle": type(pending).__name__}
    mgr.restore(model=model, optimizer=opt)
    ctx.report.update(async_restored=same(at_4, full_params(model)), async_steps=[i.step for i in mgr.list()])
    mgr.close()


SCENARIOS = {
    f.__name__: f for f in (s3_manager, s3_fsdp, ddp, fsdp, fsdp_save4, fsdp_load2, manager_kill, manager_resume)
}


def main() -> None:
    scenario, rank, world, store, workdir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    _config.COLLECTIVE_TIMEOUT_S = 30.0
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    ctx = Context(rank, world, Path(workdir))
    try:
        SCENARIOS[scenario](ctx)
    finally:
        report = Path(workdir) / f"report-{scenario}-{rank}.json"
        report.write_text(json.dumps(ctx.report, default=str))
    if scenario == "manager_kill":
        os._exit(0)  # the other rank is dead: no barrier to meet it at
    dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown of gloo threads


if __name__ == "__main__":
    main()
