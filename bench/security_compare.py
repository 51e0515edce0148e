"""Compare torchkeep with torch.load(weights_only=True), picklescan and fickling on one corpus.

    .venv/bin/pip install picklescan fickling      # comparison tools only, not dependencies
    .venv/bin/python bench/security_compare.py

The malicious corpus is tests/legacy/corpus.py (every payload only creates a marker file); the
benign set is real files of the kinds users have. Loaders run each file in a child process
that reports whether the marker appeared; scanners are static.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.legacy.corpus import write_corpus  # noqa: E402


def benign_files(directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 4)).sum().backward()
    opt.step()
    files: dict[str, Path] = {}

    def save(name: str, obj: object, **kwargs: object) -> None:
        files[name] = directory / name
        torch.save(obj, files[name], **kwargs)  # type: ignore[arg-type]

    seeds = {"epoch": 3, "model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(), "loss": 0.1}
    save("seeds_checkpoint.pth", seeds)
    save("seeds_checkpoint_legacy.pth", seeds, _use_new_zipfile_serialization=False)
    save("dataparallel.pth", nn.DataParallel(model).state_dict())
    save("pytorch_model.bin", model.state_dict())
    save("protocol4.pt", model.state_dict(), pickle_protocol=4)
    emb = torch.randn(5, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        csr = torch.randn(3, 3).to_sparse_csr()
        quantized = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(4, 4)), {nn.Linear})
    save(
        "mixed_kinds.pt",
        {
            "half": torch.randn(3).half(),
            "bf16": torch.randn(3).bfloat16(),
            "f8": torch.randn(3).to(torch.float8_e4m3fn),
            "i8": torch.arange(3, dtype=torch.int8),
            "empty": torch.empty(0),
            "strided": torch.randn(3, 4).t(),
            "tied_a": emb,
            "tied_b": emb,
            "coo": torch.randn(3, 3).to_sparse(),
            "csr": csr,
            "size": torch.Size([1, 2]),
            "numpy": np.arange(3.0),
            "ns": argparse.Namespace(lr=0.1),
        },
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save("quantized_dynamic.pt", quantized.state_dict())
    files["weights.npz"] = directory / "weights.npz"
    np.savez(files["weights.npz"], w=np.ones((2, 2)))
    try:
        from tests.legacy.test_lightning import fit_lightning

        _, path, _ = fit_lightning(directory / "lightning")
        files["lightning.ckpt"] = path
    except ImportError:
        pass
    return files


LOADER_CHILD = """
import json, os, sys, time, warnings
warnings.simplefilter("ignore")
import numpy as np, torch
tool, marker, files = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
out = {}
for name, path in files.items():
    refused, error = False, ""
    try:
        if tool == "torch":
            if path.endswith((".npy", ".npz")):
                loaded = np.load(path)
                if hasattr(loaded, "files"):
                    [loaded[k] for k in loaded.files]
            else:
                torch.load(path, weights_only=True)
        else:
            import torchkeep
            torchkeep.load_raw(path)
    except Exception as exc:
        refused, error = True, type(exc).__name__
    time.sleep(0.05)
    ran = os.path.exists(marker)
    if ran:
        os.remove(marker)
    out[name] = {"refused": refused, "ran": ran, "error": error}
print(json.dumps(out))
"""


def run_loader(tool: str, files: dict[str, Path], marker: Path) -> dict[str, dict[str, object]]:
    done = subprocess.run(
        [sys.executable, "-c", LOADER_CHILD, tool, str(marker), json.dumps({k: str(v) for k, v in files.items()})],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_scanner(tool: str, files: dict[str, Path]) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for name, path in files.items():
        flagged, error = False, ""
        try:
            if tool == "torchkeep.scan":
                import torchkeep

                flagged = torchkeep.scan(path).verdict != "safe"
            elif tool == "picklescan":
                from picklescan.scanner import scan_file_path

                result = scan_file_path(str(path))
                flagged = bool(result.issues_count or result.infected_files or result.scan_err)
            else:
                import fickling

                flagged = not fickling.is_likely_safe(str(path))
        except Exception as exc:
            flagged, error = True, type(exc).__name__
        out[name] = {"refused": flagged, "ran": False, "error": error}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default="bench/results/security.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        marker = root / "MARKER"
        malicious = write_corpus(root / "malicious", marker)
        benign = benign_files(root / "benign")
        rows = []
        results = {}
        for tool, kind in (
            ("torchkeep", "loader"),
            ("torch", "loader"),
            ("torchkeep.scan", "scanner"),
            ("picklescan", "scanner"),
            ("fickling", "scanner"),
        ):
            if kind == "loader":
                bad, good = run_loader(tool, malicious, marker), run_loader(tool, benign, marker)
            else:
                bad, good = run_scanner(tool, malicious), run_scanner(tool, benign)
            label = {"torchkeep": "torchkeep.load_raw", "torch": "torch.load(weights_only=True)"}.get(tool, tool)
            results[label] = {"malicious": bad, "benign": good}
            rows.append(
                (
                    label,
                    f"{sum(1 for r in bad.values() if r['refused'] and not r['ran'])}/{len(bad)}",
                    str(sum(1 for r in bad.values() if r["ran"])),
                    f"{sum(1 for r in good.values() if r['refused'])}/{len(good)}",
                    ", ".join(n for n, r in bad.items() if not r["refused"] or r["ran"]) or "-",
                    ", ".join(n for n, r in good.items() if r["refused"]) or "-",
                )
            )
    print("| tool | malicious stopped | code executed | benign wrongly refused | malicious missed | benign refused |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
