"""A long fuzzing campaign over every target of tests/fuzz, by hand (not part of the test suite).

Each target runs in its own child process under a hard address-space limit (RLIMIT_AS: what the
child maps after start-up plus --memory-gib, on top of the per-call bound of the harness), for
--minutes, as repeated hypothesis runs of --chunk cases each with fresh random seeds. A failure
(an escape, a time or memory overrun, a crash of the child) is shrunk by hypothesis, recorded
with its minimal input, and the campaign goes on. The report: cases per target, wall time,
outcomes per public function, the slowest call, the child's peak RSS, and every finding.

Usage (one campaign at a time; it uses one core):
    .venv/bin/python bench/fuzz_campaign.py --minutes 4 --out fuzz-campaign.json
    .venv/bin/python bench/fuzz_campaign.py --targets pickle,zip --minutes 10
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def child(target_name: str, minutes: float, chunk: int, memory_gib: float, seed: int) -> dict[str, Any]:
    """Run one target until the time is up; returns the tally as JSON-able data."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed
    from tests.fuzz import harness, seeds
    from tests.fuzz.targets import TARGETS

    target = TARGETS[target_name]
    for build in (
        seeds.checkpoint,
        seeds.run,
        seeds.safetensors,
        seeds.tied_safetensors,
        seeds.sharded,
        seeds.model_folder,
        seeds.pickled,
    ):
        build()
    # The whole child may map at most this much more than it does once warmed up.
    baseline = harness._mapped_bytes()
    hard = baseline + int(memory_gib * (1 << 30)) + (1 << 30)  # the harness's per-call bound sits below this
    resource.setrlimit(resource.RLIMIT_AS, (hard, hard))

    cases = 0
    findings: list[dict[str, Any]] = []
    seen: set[str] = set()

    def run(case: Any) -> None:
        nonlocal cases
        cases += 1
        target.run(case)

    deadline = time.monotonic() + minutes * 60
    start = time.monotonic()
    round_ = 0
    while time.monotonic() < deadline:
        round_ += 1
        test = settings(
            max_examples=chunk,
            deadline=None,
            database=None,
            phases=[Phase.generate, Phase.shrink],
            suppress_health_check=list(HealthCheck),
            report_multiple_bugs=False,
        )(given(case=target.strategy)(run))
        test = hypothesis_seed(seed * 1_000_003 + round_)(test)
        try:
            test()
        except BaseException as exc:  # a finding: record it and go on
            if isinstance(exc, KeyboardInterrupt):
                raise
            message = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
            notes = [n for n in getattr(exc, "__notes__", []) if "case=" in n or "Falsifying" in n]
            cause = exc.__cause__
            where = traceback.format_exception(cause)[-3:] if cause is not None else []
            key = message.split(":")[0] + (where[-2] if len(where) > 1 else "")
            if key not in seen:
                seen.add(key)
                findings.append({"error": message, "example": "\n".join(notes)[:4000], "where": "".join(where)[-1500:]})
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "target": target_name,
        "doc": target.doc,
        "cases": cases,
        "rounds": round_,
        "seconds": round(time.monotonic() - start, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "address_space_limit_mib": hard >> 20,
        "slowest_call_s": {k: round(v, 3) for k, v in sorted(harness.SLOWEST.items(), key=lambda kv: -kv[1])[:5]},
        "outcomes": {f"{fn} -> {outcome}": n for (fn, outcome), n in sorted(harness.TALLY.items())},
        "findings": findings,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="", help="comma-separated (default: all)")
    parser.add_argument("--minutes", type=float, default=3.0, help="per target")
    parser.add_argument("--chunk", type=int, default=300, help="cases per hypothesis run")
    parser.add_argument("--memory-gib", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--out", default="", help="write the JSON report here")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        result = child(args.child, args.minutes, args.chunk, args.memory_gib, args.seed)
        print("RESULT " + json.dumps(result))
        return 0

    from tests.fuzz.targets import TARGETS

    names = [n for n in args.targets.split(",") if n] or list(TARGETS)
    results = []
    for name in names:
        command = [
            sys.executable,
            __file__,
            "--child",
            name,
            "--minutes",
            str(args.minutes),
            "--chunk",
            str(args.chunk),
            "--memory-gib",
            str(args.memory_gib),
            "--seed",
            str(args.seed),
        ]
        started = time.monotonic()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.minutes * 60 + 900, cwd=ROOT)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if lines:
                result = json.loads(lines[-1][len("RESULT ") :])
            else:
                tail = (done.stdout + done.stderr)[-3000:]
                result = {
                    "target": name,
                    "findings": [{"error": f"child died (exit {done.returncode})", "where": tail}],
                }
        except subprocess.TimeoutExpired:
            result = {"target": name, "findings": [{"error": "child hung past its time (a call no alarm could stop)"}]}
        result["wall_s"] = round(time.monotonic() - started, 1)
        results.append(result)
        print(
            f"{name:10} {result.get('cases', 0):7} cases  {result['wall_s']:7.1f} s  "
            f"peak RSS {result.get('peak_rss_mib', 0):7.1f} MiB  findings {len(result['findings'])}",
            flush=True,
        )
        for finding in result["findings"]:
            print("   ", finding["error"], flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 1 if any(r["findings"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
