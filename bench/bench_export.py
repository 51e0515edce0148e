"""Export and verify time per model and format; size and accuracy of int8 models against float32.

    .venv/bin/python bench/bench_export.py [--repeat 3] [--json bench/results/export.json]

Models: the four of tests/export/models.py (MLP, CNN with BatchNorm, transformer block, two inputs with a
dict output). Quantization: the demo's Iris classifier and an MLP on scikit-learn's bundled digits, each
trained here, then torchkeep.quantize'd with both methods; sizes are of model.safetensors as
save_model writes it, accuracy is on the held-out split, "reload" is save_model + load_model.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.export.models import models  # noqa: E402

import torchkeep  # noqa: E402
from torchkeep.cli.demo import IrisNet, accuracy, iris_data, train  # noqa: E402


def bench_exports(repeat: int) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, example, kwargs) in models().items():
            for fmt, suffix in (("onnx", ".onnx"), ("exported_program", ".pt2"), ("torchscript", ".pt")):
                exports, verifies, errors, size = [], [], [], 0
                for i in range(repeat):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        report = torchkeep.export(
                            model, example, Path(tmp) / f"{name}-{i}{suffix}", format=fmt, example_kwargs=kwargs
                        )
                    exports.append(report.export_seconds)
                    verifies.append(report.verify_seconds)
                    errors.append(max(o.max_abs for c in report.checks for o in c.outputs))
                    size = report.size
                rows.append(
                    {
                        "model": name,
                        "format": fmt,
                        "parameters": sum(p.numel() for p in model.parameters()),
                        "export_min_s": min(exports),
                        "export_median_s": statistics.median(exports),
                        "verify_min_s": min(verifies),
                        "verify_median_s": statistics.median(verifies),
                        "bytes": size,
                        "max_abs_error": max(errors),
                    }
                )
                print(_row(rows[-1]), flush=True)
    return rows


def _row(r: dict[str, Any]) -> str:
    return (
        f"| {r['model']} | {r['format']} | {r['parameters']:,} | {r['export_min_s']:.3f} / {r['export_median_s']:.3f} "
        f"| {r['verify_min_s']:.3f} / {r['verify_median_s']:.3f} | {r['bytes']:,} | {r['max_abs_error']:.1e} |"
    )


def digits_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def digits_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(x))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def bench_quantization() -> list[dict[str, Any]]:
    rows = []
    torch.manual_seed(0)
    cases: list[tuple[str, nn.Module, tuple[torch.Tensor, ...]]] = []
    iris = iris_data()
    model = IrisNet()
    train(model, iris[0], iris[1])
    cases.append(("iris (demo)", model.eval(), iris))
    digits = digits_data()
    model = digits_model()
    train(model, digits[0], digits[1])
    cases.append(("digits MLP 64-256-256-10", model.eval(), digits))
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, (_, _, x_test, y_test) in cases:
            torchkeep.save_model(model, Path(tmp) / "fp32")
            fp32_bytes = (Path(tmp) / "fp32" / "model.safetensors").stat().st_size
            row: dict[str, Any] = {
                "model": name,
                "fp32_bytes": fp32_bytes,
                "fp32_accuracy": accuracy(model, x_test, y_test),
            }
            for method in ("int8_dynamic", "int8_weight_only"):
                quantized = torchkeep.quantize(copy.deepcopy(model), method)  # type: ignore[arg-type]
                folder = Path(tmp) / method
                start = time.perf_counter()
                torchkeep.save_model(quantized, folder)
                reloaded = torchkeep.load_model(folder, allow_modules=["torchkeep.cli.demo"])
                seconds = time.perf_counter() - start
                with torch.no_grad():
                    identical = torch.equal(reloaded(x_test), quantized(x_test))
                    drift = float((quantized(x_test) - model(x_test)).abs().max())
                row[method] = {
                    "bytes": (folder / "model.safetensors").stat().st_size,
                    "accuracy": accuracy(quantized, x_test, y_test),
                    "max_logit_change": drift,
                    "save_and_reload_s": seconds,
                    "reload_identical": identical,
                }
            rows.append(row)
            for method in ("int8_dynamic", "int8_weight_only"):
                m = row[method]
                ratio = m["bytes"] / row["fp32_bytes"]
                print(
                    f"| {name} | {method} | {row['fp32_bytes']:,} -> {m['bytes']:,} ({ratio:.2f}x) "
                    f"| {row['fp32_accuracy']:.3f} -> {m['accuracy']:.3f} | {m['max_logit_change']:.3f} "
                    f"| {m['save_and_reload_s']:.3f} | {m['reload_identical']} |",
                    flush=True,
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default="bench/results/export.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| model | format | parameters | export s (min / median) | verify s (min / median) | bytes | max abs error |")
    print("|---|---|---|---|---|---|---|")
    exports = bench_exports(args.repeat)
    print(
        "\n| model | method | model.safetensors bytes | test accuracy fp32 -> int8 | max logit change | save+load s "
        "| reload identical |"
    )
    print("|---|---|---|---|---|---|---|")
    quantization = bench_quantization()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"exports": exports, "quantization": quantization}, indent=2))


if __name__ == "__main__":
    main()
