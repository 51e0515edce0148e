"""Attack classes against torchkeep, torch.load(weights_only=True), picklescan and fickling: one run, one record.

    .venv/bin/pip install --target /tmp/cmptools picklescan fickling    # comparison tools only, not dependencies
    .venv/bin/python bench/attack_table.py [--tools /tmp/cmptools] [--json bench/results/attack_table.json]

By hand, not part of the test suite. It builds, in a temporary folder, the files the tests use:

1. Code execution: tests/legacy/exploits.py (90 files, 7 technique classes; each proven by
   tests/legacy/test_exploits.py to run its payload, creating a marker file, under the loader it
   targets). Per file: ``torchkeep.load_raw``; ``torch.load(path, weights_only=True)`` (for the
   files made for NumPy, ``np.load(path, allow_pickle=False)`` instead, every member read: torch
   has no reader for them); ``torchkeep.scan`` (exit code); picklescan and fickling (a scanner
   error counts as flagged, as in bench/security_compare.py, whose ``run_scanner`` is used).
   A loader "stopped" a file when it raised and no marker appeared (checked right after the call
   and again 2 s after the whole pass: spawned processes may create it late); "loaded" when it
   returned without running the payload; "ran code" when the marker appeared.
2. Resource attacks: tests/legacy/hostile.py (bare pickles and torch zips that demand gigabytes,
   recurse without end or run quadratic; tensors whose views lie). Per file: the two loaders and
   the three scanners. torchkeep must raise the typed error the suite expects.
3. DCP folders whose metadata lies (tests/legacy/test_dcp_hostile.py's helpers): missing,
   partial and overlapping chunks, a missing storage entry. torchkeep.load_raw against torch's
   ``dcp_to_torch_save`` (then ``torch.load(weights_only=True)`` of its output) and ``dcp.load``
   into a state dict pre-filled with -7.

Every call runs in a child forked from this process (torch already imported, so no start-up
cost) under RLIMIT_AS = 3 GiB (this process maps about 0.7 GiB) and a 60 s alarm, as
tests/legacy/test_bounded.py limits its child. Its peak memory is the growth of its resident
set during the call (VmHWM after, with the high-water mark reset before, minus VmRSS before).
Outcomes: returned, raised (with the exception's type; a typed error is a TorchkeepError),
MemoryError (or torch's "can't allocate memory") under the limit, killed (a signal), timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import resource
import select
import shutil
import signal
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # children are forked: no thread pools in the parent

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from security_compare import run_scanner  # noqa: E402
from tests.legacy.exploits import TECHNIQUES, Exploit, build  # noqa: E402
from tests.legacy.hostile import write_hostile  # noqa: E402

import torchkeep  # noqa: E402

LIMIT = 3 << 30  # RLIMIT_AS of every child, bytes
SECONDS = 60  # alarm of every child
Result = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# One call in a forked child, bounded in memory and time


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _out_of_memory(exc: BaseException | None) -> bool:
    for _ in range(20):
        if exc is None:
            return False
        text = str(exc)
        if isinstance(exc, MemoryError) or "can't allocate memory" in text or "bad_alloc" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _short(text: str) -> str:
    """torch's UnpicklingError puts the real reason at the end of a long message: keep both ends."""
    return text if len(text) <= 400 else text[:120] + " [...] " + text[-280:]


def _causes(exc: BaseException) -> list[str]:
    out: list[str] = []
    cause = exc.__cause__ or exc.__context__
    while cause is not None and len(out) < 5:
        out.append(type(cause).__name__)
        cause = cause.__cause__ or cause.__context__
    return out


def _child(call: Callable[[], Result], write_fd: int) -> None:
    """In the forked child: run ``call`` under the limits, write two JSON lines, never return."""
    code = 0
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
        before = _status_kib("VmRSS")
        os.write(write_fd, (json.dumps({"rss_before_kib": before}) + "\n").encode())
        resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))
        signal.signal(signal.SIGALRM, signal.SIG_DFL)  # the alarm kills the child, wherever it is
        signal.alarm(SECONDS)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = call()
        except BaseException as exc:
            result = {
                "outcome": "memory" if _out_of_memory(exc) else "raised",
                "error": type(exc).__name__,
                "typed": isinstance(exc, torchkeep.TorchkeepError),
                "message": _short(str(exc)),
                "causes": _causes(exc),
            }
        signal.alarm(0)
        result["peak_kib"] = _status_kib("VmHWM")
        data = (json.dumps(result, default=str) + "\n").encode()
        while data:
            data = data[os.write(write_fd, data) :]
    except BaseException:
        code = 70
    finally:
        os._exit(code)


def in_child(call: Callable[[], Result]) -> Result:
    """``call()`` in a forked child: its result, or how it ended, with peak memory (MiB) and seconds."""
    sys.stdout.flush()
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child(call, write_fd)
    os.close(write_fd)
    chunks = []
    deadline = start + SECONDS + 30
    while True:
        ready, _, _ = select.select([read_fd], [], [], max(deadline - time.perf_counter(), 0))
        if not ready:  # something kept the pipe open past the alarm
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            break
        chunk = os.read(read_fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_fd)
    _, status, usage = os.wait4(pid, 0)
    seconds = time.perf_counter() - start
    lines = b"".join(chunks).decode(errors="replace").splitlines()
    before = json.loads(lines[0])["rss_before_kib"] if lines else 0
    if len(lines) >= 2:
        result: Result = json.loads(lines[1])
    elif os.WIFSIGNALED(status):
        sig = signal.Signals(os.WTERMSIG(status))
        result = {"outcome": "timeout" if sig == signal.SIGALRM else "killed", "error": sig.name}
    else:
        result = {"outcome": "killed", "error": f"exit status {os.WEXITSTATUS(status)}"}
    peak = result.pop("peak_kib", usage.ru_maxrss)
    result["peak_mib"] = round(max(peak - before, 0) / 1024, 1)
    result["seconds"] = round(seconds, 2)
    return result


# ---------------------------------------------------------------------------------------------
# What each tool does with one path (called inside the child)


def torchkeep_load(path: Path) -> Result:
    torchkeep.load_raw(path)
    return {"outcome": "returned"}


def torch_load(path: Path, numpy: bool = False) -> Result:
    if numpy:  # files made for NumPy: its safe mode, every member read
        loaded = np.load(path, allow_pickle=False)
        if hasattr(loaded, "files"):
            [loaded[k] for k in loaded.files]
        return {"outcome": "returned", "type": type(loaded).__name__}
    return {"outcome": "returned", "type": type(torch.load(path, weights_only=True)).__name__}


def torchkeep_scan(path: Path) -> Result:
    report = torchkeep.scan(path)
    return {"outcome": "flagged" if report.exit_code else "safe", "exit_code": report.exit_code}


def other_scan(tool: str, path: Path) -> Result:
    verdict = run_scanner(tool, {"file": path})["file"]
    return {"outcome": "flagged" if verdict["refused"] else "safe", "error": verdict["error"]}


def scanners(tools: dict[str, bool]) -> dict[str, Callable[[Path], Result]]:
    out: dict[str, Callable[[Path], Result]] = {"torchkeep.scan": torchkeep_scan}
    for tool, available in tools.items():
        if available:
            out[tool] = functools.partial(other_scan, tool)
    return out


def available_tools(path: str) -> dict[str, bool]:
    sys.path.append(path)
    tools = {}
    for tool, module in (("picklescan", "picklescan.scanner"), ("fickling", "fickling")):
        try:
            __import__(module)
            tools[tool] = True
        except ImportError:
            tools[tool] = False
    return tools


def versions(tools: dict[str, bool]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"torch": torch.__version__, "numpy": np.__version__, "python": sys.version.split()[0]}
    for tool, available in tools.items():
        try:
            out[tool] = version(tool) if available else "n/a"
        except PackageNotFoundError:
            out[tool] = "?"
    return out


def _remove(path: Path) -> bool:
    """Was ``path`` there (a marker file, or the folder venv.create makes)? It is gone afterwards."""
    if path.is_dir():
        shutil.rmtree(path)
        return True
    if path.exists():
        path.unlink()
        return True
    return False


# ---------------------------------------------------------------------------------------------
# 1. Code execution


def loader_pass(exploits: list[Exploit], load: Callable[[Exploit], Result]) -> dict[str, Result]:
    out = {}
    for e in exploits:
        result = load(e)
        result["ran"] = _remove(e.marker)
        out[e.name] = result
    time.sleep(2)  # a spawned process may create its marker a moment later
    for e in exploits:
        if _remove(e.marker):
            out[e.name]["ran"] = True
    return out


def code_execution(root: Path, tools: dict[str, bool]) -> tuple[list[list[str]], dict[str, Any]]:
    exploits = build(root / "exploits", root / "markers")
    results: dict[str, dict[str, Result]] = {
        "torchkeep.load_raw": loader_pass(exploits, lambda e: in_child(lambda: torchkeep_load(e.path))),
        "torch.load(weights_only=True)": loader_pass(
            exploits, lambda e: in_child(lambda: torch_load(e.path, numpy=e.loader == "numpy"))
        ),
    }
    for tool, scan in scanners(tools).items():
        results[tool] = {e.name: in_child(functools.partial(scan, e.path)) for e in exploits}
    leftovers = [e.name for e in exploits if _remove(e.marker)]

    def stopped(tool: str, names: list[str]) -> str:
        res = [results[tool][n] for n in names]
        s = sum(1 for r in res if r["outcome"] != "returned" and not r["ran"])
        typed = sum(1 for r in res if r.get("typed") and not r["ran"])
        return f"{s}/{len(res)}" + (f" (typed {typed})" if tool.startswith("torchkeep") else "")

    def torch_cell(names: list[str]) -> str:
        res = [results["torch.load(weights_only=True)"][n] for n in names]
        ran = sum(1 for r in res if r["ran"])
        loaded = sum(1 for r in res if r["outcome"] == "returned" and not r["ran"])
        s = len(res) - ran - loaded
        return f"stopped {s}, loaded {loaded}, ran code {ran}"

    def flagged(tool: str, names: list[str]) -> str:
        if tool not in results:
            return "n/a"
        res = [results[tool][n] for n in names]
        errors = sum(1 for r in res if r.get("error"))
        count = sum(1 for r in res if r["outcome"] != "safe")
        return f"{count}/{len(res)}" + (f" ({errors} by error)" if errors else "")

    rows = []
    for technique in [*TECHNIQUES, "total"]:
        names = [e.name for e in exploits if technique in (e.technique, "total")]
        rows.append(
            [
                technique,
                str(len(names)),
                stopped("torchkeep.load_raw", names),
                str(sum(1 for n in names if results["torchkeep.load_raw"][n]["ran"])),
                torch_cell(names),
                flagged("torchkeep.scan", names),
                flagged("picklescan", names),
                flagged("fickling", names),
            ]
        )
    details = {
        "files": {e.name: {"technique": e.technique, "loader": e.loader, "file": e.path.name} for e in exploits},
        "results": results,
        "markers_left_after_scanners": leftovers,
    }
    return rows, details


# ---------------------------------------------------------------------------------------------
# 2. Resource attacks


def resources(root: Path, tools: dict[str, bool]) -> tuple[list[list[str]], dict[str, Any]]:
    hostile = write_hostile(root / "hostile")
    results: dict[str, dict[str, Result]] = {"torchkeep.load_raw": {}, "torch.load(weights_only=True)": {}}
    for name, (path, error, fragment) in hostile.items():
        r = in_child(functools.partial(torchkeep_load, path))
        r["as_expected"] = r.get("error") == error and fragment in r.get("message", "")
        results["torchkeep.load_raw"][name] = r
        results["torch.load(weights_only=True)"][name] = in_child(functools.partial(torch_load, path))
    for tool, scan in scanners(tools).items():
        results[tool] = {name: in_child(functools.partial(scan, path)) for name, (path, _, _) in hostile.items()}

    def summary(tool: str) -> list[str]:
        if tool not in results:
            return [tool, "n/a", "n/a", "n/a", "n/a"]
        res = list(results[tool].values())
        outcomes = Counter(r["outcome"] if r["outcome"] != "raised" else f"raised {r['error']}" for r in res)
        typed = sum(1 for r in res if r.get("typed"))
        if tool == "torchkeep.load_raw":
            typed_cell = f"{typed}/{len(res)} ({sum(1 for r in res if r['as_expected'])} the expected type and reason)"
        elif tool == "torch.load(weights_only=True)":
            typed_cell = "-"
        else:
            typed_cell = f"called safe: {outcomes.get('safe', 0)}/{len(res)}"
        return [
            tool,
            typed_cell,
            ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items(), key=lambda kv: -kv[1])),
            f"{max(r['peak_mib'] for r in res):.0f}",
            f"{max(r['seconds'] for r in res):.1f}",
        ]

    rows = [summary(tool) for tool in ("torchkeep.load_raw", "torch.load(weights_only=True)", *scanners(tools))]
    if not tools.get("picklescan"):
        rows.append(summary("picklescan"))
    if not tools.get("fickling"):
        rows.append(summary("fickling"))
    details = {
        "files": {name: {"expected": error, "fragment": fragment} for name, (_, error, fragment) in hostile.items()},
        "results": results,
    }
    return rows, details


# ---------------------------------------------------------------------------------------------
# 3. DCP folders whose metadata lies


def dcp_folders(root: Path) -> tuple[list[list[str]], dict[str, Any]]:
    from tests.legacy.test_dcp_hostile import edit_metadata, saved, split_in_two_chunks, storage_key
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    def shrink(metadata: Any) -> None:
        metadata.state_dict_metadata["w"].chunks[0] = ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([2, 3]))

    folders: dict[str, tuple[Path, torch.Tensor]] = {}
    for name in ("intact", "missing chunk", "chunk covering half", "overlapping chunks", "missing storage entry"):
        work = root / "dcp" / name.replace(" ", "_")
        work.mkdir(parents=True)
        folder = saved(work)
        expected = torchkeep.load_raw(folder)["w"]
        if name == "missing chunk":
            edit_metadata(folder, lambda m: m.state_dict_metadata["w"].chunks.clear())
        elif name == "chunk covering half":
            edit_metadata(folder, shrink)
        elif name == "overlapping chunks":
            expected = split_in_two_chunks(folder, ((0, 2), (1, 3)))  # rows 0-1 and 1-2: row 3 never written
        elif name == "missing storage entry":
            edit_metadata(folder, lambda m: m.storage_data.pop(storage_key(m, "w")))
        folders[name] = (folder, expected)

    def verdict(w: Any, expected: torch.Tensor) -> Result:
        if not isinstance(w, torch.Tensor) or w.shape != expected.shape:
            return {"outcome": "returned", "w": "missing or another shape"}
        if torch.equal(w, expected):
            return {"outcome": "returned", "w": "correct"}
        stale = int((w == -7).all(dim=1).sum())
        return {"outcome": "returned", "w": "WRONG" + (f" ({stale} of 4 rows never loaded)" if stale else "")}

    def via_torchkeep(folder: Path, expected: torch.Tensor) -> Result:
        return verdict(torchkeep.load_raw(folder)["w"], expected)

    def via_dcp_to_torch_save(folder: Path, expected: torch.Tensor) -> Result:
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        out = folder.parent / "converted.pt"
        dcp_to_torch_save(folder, out)
        return verdict(torch.load(out, weights_only=True)["w"], expected)

    def via_dcp_load(folder: Path, expected: torch.Tensor) -> Result:
        from torch.distributed.checkpoint import state_dict_loader

        state: dict[str, Any] = {"w": torch.full((4, 3), -7.0), "b": torch.full((4, 3), -7.0), "step": 0}
        state_dict_loader.load(state, checkpoint_id=str(folder), no_dist=True)
        return verdict(state["w"], expected)

    readers = {
        "torchkeep.load_raw": via_torchkeep,
        "dcp_to_torch_save + torch.load": via_dcp_to_torch_save,
        "dcp.load into a state dict": via_dcp_load,
    }
    results = {
        name: {reader: in_child(functools.partial(run, folder, expected)) for reader, run in readers.items()}
        for name, (folder, expected) in folders.items()
    }

    def cell(r: Result) -> str:
        if r["outcome"] == "returned":
            return f"returned, w {r['w']}"
        return f"{r['outcome']} {r.get('error', '')}".strip()

    rows = [[name, *(cell(results[name][reader]) for reader in readers)] for name in folders]
    return rows, {"results": results}


# ---------------------------------------------------------------------------------------------


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tools", default="/tmp/cmptools", help="where picklescan and fickling are installed")
    parser.add_argument("--json", default=str(ROOT / "bench/results/attack_table.json"))
    parser.add_argument("--parts", default="exec,resources,dcp", help="comma-separated: exec, resources, dcp")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tools = available_tools(args.tools)
    parts = set(args.parts.split(","))
    report: dict[str, Any] = {
        "command": "bench/attack_table.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "versions": versions(tools),
        "limits": {"address_space_bytes": LIMIT, "seconds": SECONDS},
    }
    print(f"versions: {report['versions']}; each call forked under RLIMIT_AS {LIMIT >> 30} GiB, {SECONDS} s\n")
    with tempfile.TemporaryDirectory(prefix="torchkeep-attacks-") as tmp:
        root = Path(tmp)
        if "exec" in parts:
            start = time.perf_counter()
            rows, report["code_execution"] = code_execution(root, tools)
            header = ["technique", "files", "torchkeep.load_raw stopped", "torchkeep ran code",
                      "torch.load(weights_only=True) / np.load(allow_pickle=False)", "torchkeep.scan exit != 0",
                      "picklescan flags", "fickling flags"]  # fmt: skip
            report["code_execution"]["table"] = [header, *rows]
            print("## Code execution (tests/legacy/exploits.py)\n\n" + table(header, rows))
            print(f"\n({time.perf_counter() - start:.0f} s)\n", flush=True)
        if "resources" in parts:
            start = time.perf_counter()
            rows, report["resources"] = resources(root, tools)
            count = len(report["resources"]["files"])
            header = ["tool", f"typed errors (of {count})", "outcomes", "max peak MiB", "max s"]
            report["resources"]["table"] = [header, *rows]
            print("## Resource attacks (tests/legacy/hostile.py)\n\n" + table(header, rows))
            print(f"\n({time.perf_counter() - start:.0f} s)\n", flush=True)
        if "dcp" in parts:
            start = time.perf_counter()
            rows, report["dcp"] = dcp_folders(root)
            header = ["DCP folder", "torchkeep.load_raw", "dcp_to_torch_save + torch.load", "dcp.load into a dict"]
            report["dcp"]["table"] = [header, *rows]
            print("## DCP metadata that lies (tests/legacy/test_dcp_hostile.py)\n\n" + table(header, rows))
            print(f"\n({time.perf_counter() - start:.0f} s)\n", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
