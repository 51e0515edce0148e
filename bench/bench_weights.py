"""Benchmark torchkeep.save / load against torch.save / torch.load, safetensors and the raw floor.

Run by hand (not part of the test suite), on a quiet machine, as root for the cold-cache runs:

    .venv/bin/python bench/bench_weights.py [--repeats 5] [--cases gpt2-medium,small] [--dir /var/tmp/tkbench]

Every time is wall-clock seconds; each table gives min and median over the repeats and the ratio
of the median to the raw floor measured in the same run (the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import safetensors.torch as st
import torch

import torchkeep


def gpt2_medium_state() -> dict[str, torch.Tensor]:
    """GPT-2 medium's real shapes (24 layers, d=1024, vocab 50257): ~355M float32 parameters."""
    g = torch.Generator().manual_seed(0)
    d, vocab, ctx = 1024, 50257, 1024

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    state = {"wte.weight": r(vocab, d), "wpe.weight": r(ctx, d)}
    for i in range(24):
        p = f"h.{i}."
        state |= {
            p + "ln_1.weight": r(d),
            p + "ln_1.bias": r(d),
            p + "attn.c_attn.weight": r(d, 3 * d),
            p + "attn.c_attn.bias": r(3 * d),
            p + "attn.c_proj.weight": r(d, d),
            p + "attn.c_proj.bias": r(d),
            p + "ln_2.weight": r(d),
            p + "ln_2.bias": r(d),
            p + "mlp.c_fc.weight": r(d, 4 * d),
            p + "mlp.c_fc.bias": r(4 * d),
            p + "mlp.c_proj.weight": r(4 * d, d),
            p + "mlp.c_proj.bias": r(d),
        }
    state |= {"ln_f.weight": r(d), "ln_f.bias": r(d)}
    return state


def small_state() -> dict[str, torch.Tensor]:
    """20,000 float32 tensors of 1-4 KiB (~51 MB)."""
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(256, 1025, (20_000,), generator=g).tolist()
    return {f"block.{i // 100}.param_{i % 100}": torch.randn(n, generator=g) for i, n in enumerate(sizes)}


CASES: dict[str, Callable[[], dict[str, torch.Tensor]]] = {"gpt2-medium": gpt2_medium_state, "small": small_state}


def nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def touch(state: dict[str, torch.Tensor]) -> None:
    """Read one byte of every 4 KiB page of every tensor, so lazy (mmap) loads pay in full."""
    for t in state.values():
        if t.numel():
            t.reshape(-1).view(torch.uint8)[::4096].sum()


def timed(fn: Callable[[], object], repeats: int, before: Callable[[], object] | None = None) -> list[float]:
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        gc.collect()
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        del result
    return times


def row(name: str, times: list[float], floor: float) -> dict[str, object]:
    median = statistics.median(times)
    return {"method": name, "min": min(times), "median": median, "x_floor": median / floor}


def bench_case(case: str, workdir: Path, repeats: int, cold: bool) -> dict[str, list[dict[str, object]]]:
    state = CASES[case]()
    total = nbytes(state)
    print(f"\n## {case}: {len(state)} tensors, {total / 1e6:.1f} MB", flush=True)
    raw_buf = torch.cat([t.reshape(-1).view(torch.uint8) for t in state.values()]).numpy()
    paths = {k: workdir / f"{case}.{k}" for k in ("raw", "tk.safetensors", "torch.pt", "st.safetensors")}
    paths = {k.split(".")[0]: v for k, v in paths.items()}

    def raw_save() -> None:
        with open(paths["raw"], "wb", buffering=0) as f:
            f.write(memoryview(raw_buf))
            os.fsync(f.fileno())

    def torch_save() -> None:
        torch.save(state, paths["torch"])
        fsync_path(paths["torch"])

    def st_save() -> None:
        st.save_file(state, paths["st"])
        fsync_path(paths["st"])

    results: dict[str, list[dict[str, object]]] = {}
    save = {
        "raw write + fsync": timed(raw_save, repeats),
        "torchkeep.save": timed(lambda: torchkeep.save(state, paths["tk"]), repeats),
        "torch.save + fsync": timed(torch_save, repeats),
        "safetensors.save_file + fsync": timed(st_save, repeats),
    }
    floor = statistics.median(save["raw write + fsync"])
    results["save"] = [row(k, v, floor) for k, v in save.items()]
    state.clear()  # free the source tensors before measuring loads
    gc.collect()

    buf = bytearray(os.path.getsize(paths["raw"]))

    def raw_load() -> None:
        with open(paths["raw"], "rb", buffering=0) as f:
            f.readinto(buf)

    def raw_load_fresh() -> torch.Tensor:
        fresh = torch.empty(len(buf), dtype=torch.uint8)
        with open(paths["raw"], "rb", buffering=0) as f:
            f.readinto(memoryview(fresh.numpy()))
        return fresh

    def st_load() -> dict[str, torch.Tensor]:
        loaded = st.load_file(paths["st"])
        touch(loaded)
        return loaded

    def tk_mmap_touch() -> dict[str, torch.Tensor]:
        loaded = torchkeep.load(paths["tk"], mmap=True)
        touch(loaded)
        return loaded

    def first_tensor() -> torch.Tensor:
        loaded = torchkeep.load(paths["tk"], mmap=True)
        first = next(iter(loaded.values()))
        first.reshape(-1)[0].item()
        return first

    loads: dict[str, Callable[[], object]] = {
        "raw readinto": raw_load,
        "raw readinto, fresh buffer": raw_load_fresh,
        "torchkeep.load (verify)": lambda: torchkeep.load(paths["tk"]),
        "torchkeep.load (verify=False)": lambda: torchkeep.load(paths["tk"], verify=False),
        "torchkeep.load mmap, touched": tk_mmap_touch,
        "torch.load(weights_only=True)": lambda: torch.load(paths["torch"], weights_only=True),
        "safetensors.load_file, touched": st_load,
    }
    warm = {k: timed(fn, repeats, before=raw_load) for k, fn in loads.items()}
    floor = statistics.median(warm["raw readinto"])
    results["load (warm)"] = [row(k, v, floor) for k, v in warm.items()]
    ttft = timed(first_tensor, repeats)
    results["time to first tensor (mmap, warm)"] = [
        {"method": "torchkeep.load(mmap=True) + first value", "min": min(ttft), "median": statistics.median(ttft)}
    ]
    if cold and drop_caches():
        cold_loads = {
            k: loads[k]
            for k in (
                "raw readinto",
                "raw readinto, fresh buffer",
                "torchkeep.load (verify)",
                "torch.load(weights_only=True)",
                "safetensors.load_file, touched",
            )
        }
        cold_times = {k: timed(fn, max(2, repeats - 2), before=drop_caches) for k, fn in cold_loads.items()}
        floor = statistics.median(cold_times["raw readinto"])
        results["load (cold cache)"] = [row(k, v, floor) for k, v in cold_times.items()]
    results["peak RSS of a full load"] = [
        peak_rss(paths["tk"], "torchkeep"),
        peak_rss(paths["st"], "safetensors"),
        peak_rss(paths["torch"], "torch"),
    ]
    for p in paths.values():
        p.unlink(missing_ok=True)
    return results


RSS_SCRIPT = """
import resource, sys, torch, torchkeep, safetensors.torch as st
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize()
path, kind, warmup = sys.argv[1], sys.argv[2], sys.argv[3]
def full_load(p):
    if kind == 'torchkeep':
        return torchkeep.load(p)
    if kind == 'safetensors':
        out = st.load_file(p)
        for t in out.values():
            if t.numel(): t.reshape(-1).view(torch.uint8)[::4096].sum()
        return out
    return torch.load(p, weights_only=True)
full_load(warmup)  # first-call initialisation is not the load's memory
base = rss()
out = full_load(path)
# VmHWM, not ru_maxrss: ru_maxrss survives exec and would report the parent's peak.
peak = int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024
print(peak - base)
"""


def peak_rss(path: Path, kind: str) -> dict[str, object]:
    size = path.stat().st_size
    warmup = path.with_name("warmup" + "".join(path.suffixes))
    tiny = {"w": torch.ones(4)}
    if kind == "torch":
        torch.save(tiny, warmup)
    elif kind == "torchkeep":
        torchkeep.save(tiny, warmup)
    else:
        st.save_file(tiny, warmup)
    done = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(path), kind, str(warmup)], capture_output=True, text=True, check=True
    )
    warmup.unlink()
    grown = int(done.stdout.strip())
    return {"method": kind, "peak_rss_growth_mb": grown / 1e6, "x_file_size": grown / size}


def to_markdown(case: str, results: dict[str, list[dict[str, object]]]) -> str:
    lines = [f"### {case}"]
    for section, rows in results.items():
        lines += ["", f"**{section}**", ""]
        keys = list(rows[0])
        lines.append("| " + " | ".join(keys) + " |")
        lines.append("|" + "---|" * len(keys))
        for r in rows:
            cells = [f"{v:.4f}" if isinstance(v, float) else str(v) for v in r.values()]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", default="gpt2-medium,small")
    parser.add_argument("--dir", default="/var/tmp/tkbench")
    parser.add_argument("--no-cold", action="store_true")
    parser.add_argument("--json", default="bench/results/weights.json")
    args = parser.parse_args()
    workdir = Path(args.dir)
    workdir.mkdir(parents=True, exist_ok=True)
    all_results = {}
    for case in args.cases.split(","):
        all_results[case] = bench_case(case, workdir, args.repeats, cold=not args.no_cold)
        print(to_markdown(case, all_results[case]), flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(all_results, indent=2))


if __name__ == "__main__":
    main()
