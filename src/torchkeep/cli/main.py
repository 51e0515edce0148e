"""Entry point of the ``torchkeep`` command."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torchkeep.checkpoint.io import checkpoint_size, read_checkpoint
from torchkeep.checkpoint.layout import MANIFEST_FILE
from torchkeep.checkpoint.sharded import parse_section
from torchkeep.cli.progress import Bar
from torchkeep.errors import TorchkeepError
from torchkeep.format.dtypes import ITEMSIZE
from torchkeep.format.pickle.scan import scan
from torchkeep.manager.folders import is_run
from torchkeep.manager.manager import CheckpointManager
from torchkeep.model.io import is_model_dir, read_config, read_model_manifest
from torchkeep.storage.remote import is_url
from torchkeep.weights.inspect import inspect
from torchkeep.weights.load import is_training_checkpoint
from torchkeep.weights.verify import verify


def _inspect(args: argparse.Namespace) -> int:
    if is_training_checkpoint(args.path, args.storage_options):
        return _inspect_checkpoint(args)
    if is_model_dir(args.path):
        return _inspect_model(args)
    info = inspect(args.path, storage_options=args.storage_options)
    spec = None if is_url(args.path) else _export_spec(Path(args.path))
    if args.json:
        print(json.dumps({**info.to_dict(), **({"export_spec": spec} if spec else {})}, indent=2))
    elif args.tree:
        print(info.tree())
    else:
        print(info)
        if spec:
            print(_spec_summary(spec))
    return 0 if info.scan is None else int(info.scan["exit_code"])  # a pickle's verdict, as `torchkeep scan`


def _export_spec(path: Path) -> dict[str, Any] | None:
    """The I/O spec torchkeep.export wrote beside an artifact, if it is there and readable."""
    from torchkeep.exporting.report import SPEC_FORMAT, SPEC_SUFFIX
    from torchkeep.format.jsondoc import parse_json

    path = Path(os.path.abspath(path))  # "." has no name to put a suffix on
    side = path.with_name(path.name + SPEC_SUFFIX)
    if not side.is_file() or side.stat().st_size > 1 << 20:
        return None
    try:
        spec = parse_json(side.read_bytes(), str(side), "export spec")
    except TorchkeepError:
        return None
    return spec if isinstance(spec, dict) and spec.get("format") == SPEC_FORMAT else None


def _spec_summary(spec: dict[str, Any]) -> str:
    def shapes(items: Any) -> str:
        if not isinstance(items, list):
            return "?"
        return "; ".join(
            f"{i.get('name')}: {i.get('dtype')}[{', '.join(map(str, i.get('shape', [])))}]"
            for i in items
            if isinstance(i, dict)
        )

    io = f"inputs {shapes(spec.get('inputs'))}; outputs {shapes(spec.get('outputs'))}"
    lines = [f"exported by torchkeep ({spec.get('kind')}): {io}"]
    for check in spec.get("verified") or []:
        if isinstance(check, dict):
            worst = max((o.get("max_abs", 0.0) for o in check.get("outputs", []) if isinstance(o, dict)), default=0.0)
            lines.append(f"  verified on {check.get('inputs')}: max abs error {worst:.2g}")
    return "\n".join(lines)


def _inspect_checkpoint(args: argparse.Namespace) -> int:
    loaded = read_checkpoint(args.path, storage_options=args.storage_options)
    manifest = loaded.manifest
    tensors = inspect(f"{loaded.path}/{manifest['tensors_file']['name']}", storage_options=args.storage_options)
    section = parse_section(manifest, f"{loaded.path}/{MANIFEST_FILE}")
    summary = {
        "path": str(args.path),
        "format": f"{manifest['format']} v{manifest['version']}",
        "torch": manifest.get("torch"),
        "torchkeep": manifest.get("torchkeep"),
        "created": manifest.get("created"),
        "objects": sorted(manifest.get("objects", {})),
        "info": loaded.info(),
        "state": {k: _short(v) for k, v in loaded.state().items()},
        "tensors": tensors.to_dict()["tensors"],
        "total_bytes": tensors.total_bytes,
    }
    if section is not None:
        layout = section.dcp_layout or {}
        summary["distributed"] = {
            "world_size": section.world_size,
            "sharded_tensors": len(layout),
            "sharded_bytes": sum(
                math.prod(e["shape"]) * ITEMSIZE.get(e["dtype"], 0) for e in layout.values() if isinstance(e, dict)
            ),
            "dcp_files": len(section.dcp_files),
        }
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    print(f"{args.path}: {summary['format']} (torch {summary['torch']}, torchkeep {summary['torchkeep']})")
    print(f"objects: {', '.join(summary['objects']) or '-'}")
    if summary["info"]:
        print(f"info: {summary['info']}")
    if "distributed" in summary:
        d = summary["distributed"]
        print(
            f"saved by {d['world_size']} rank(s): {d['sharded_tensors']} sharded tensors "
            f"({d['sharded_bytes'] / 1e6:.1f} MB) in {d['dcp_files']} DCP files; shared tensors below"
        )
    print("state: " + (", ".join(f"{k}={v}" for k, v in summary["state"].items()) or "-"))
    print(tensors.tree() if args.tree else tensors.table())
    return 0


def _inspect_model(args: argparse.Namespace) -> int:
    root = Path(args.path)
    manifest = read_model_manifest(root) or {}
    config = read_config(root)
    weights = inspect(root)
    if args.json:
        print(json.dumps({"path": str(root), "manifest": manifest, "config": config, **weights.to_dict()}, indent=2))
        return 0
    print(f"{root}: torchkeep model v{manifest.get('version')}")
    print(f"class: {manifest.get('class') or 'stock torch.nn layers (no class needed)'}")
    print(f"config ({manifest.get('config_source')}): {json.dumps(config)}")
    print(f"parameters: {manifest.get('parameters') or 0:,} ({manifest.get('dtype')})")
    print(weights.tree() if args.tree else weights.table())
    return 0


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _ls(args: argparse.Namespace) -> int:
    remote = {"storage_options": args.storage_options} if is_url(args.directory) else {}
    if not remote and Path(args.directory).is_dir() and not is_run(args.directory):
        return _ls_files(Path(args.directory), args.json)  # not a run: what each file or folder is
    manager = CheckpointManager(args.directory, read_only=True, monitor=args.monitor, mode=args.mode, **remote)
    infos = manager.list()
    if args.json:
        steps = [
            {"step": i.step, "path": str(i.path), "time": i.time, "size": i.size, "metrics": i.metrics,
             "latest": i.is_latest, "best": i.is_best}
            for i in infos
        ]  # fmt: skip
        print(json.dumps({"checkpoints": steps, "damaged": manager.damaged}, indent=2, default=str))
        return 0
    rows = [("step", "time", "size", "metrics", "")]
    for info in infos:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.time))
        marks = " ".join(m for m, on in (("latest", info.is_latest), ("best", info.is_best)) if on)
        metrics = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.metrics.items())
        rows.append((str(info.step), when, f"{info.size / 1e6:.2f} MB", metrics, marks))
    _print_table(rows)
    for name, why in manager.damaged.items():
        print(f"damaged: {name}: {why}")
    return 0


def _ls_files(folder: Path, as_json: bool) -> int:
    """Each entry of a folder that is not a CheckpointManager run: what it is, as inspect says (structure
    only, nothing unpickled that the scanner does not pass), or why it is not readable."""
    entries: list[dict[str, Any]] = []
    for entry in sorted(p for p in folder.iterdir() if not p.name.startswith(".")):
        try:
            if is_training_checkpoint(entry):
                what, tensors = "torchkeep checkpoint", len(read_checkpoint(entry, verify=False).decoder.tensors)
                size = checkpoint_size(entry)
            else:
                info = inspect(entry)
                what = info.format + (f"; {info.contents.layout}" if info.contents is not None else "")
                if info.scan is not None and info.scan["exit_code"]:
                    what += f"; scan: {info.scan['status']}"
                tensors, size = len(info.tensors), info.file_bytes
        except (TorchkeepError, OSError) as exc:  # one unreadable entry does not stop the listing
            problem = getattr(exc, "problem", None) or str(exc)
            what, tensors = f"not readable as weights or a checkpoint: {problem}", 0
            size = entry.stat().st_size if entry.is_file() else 0
        entries.append({"name": entry.name + ("/" if entry.is_dir() else ""), "size": size, "tensors": tensors,
                        "what": what})  # fmt: skip
    if as_json:
        print(json.dumps({"files": entries}, indent=2))
        return 0
    if not entries:
        print(f"{folder}: empty (no files, no checkpoints)")
        return 0
    rows = [("name", "size", "tensors", "what")]
    rows += [(e["name"], f"{e['size'] / 1e6:.2f} MB", str(e["tensors"]), e["what"]) for e in entries]
    _print_table(rows)
    return 0


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _verify(args: argparse.Namespace) -> int:
    if is_training_checkpoint(args.path, args.storage_options):
        from torchkeep.weights.verify import verify_checkpoint

        tensors, parts = verify_checkpoint(args.path, args.storage_options)  # manifest, objects, ranks' files
        files = f", and {parts} rank and DCP files" if parts is not None else ""
        print(f"{args.path}: OK, checkpoint with {tensors} tensors verified{files}")
        return 0
    checked = verify(args.path, storage_options=args.storage_options, progress=Bar("verifying", always=args.progress))
    if checked is None:
        print(
            f"{args.path}: readable, every byte read as load reads it; no checksums recorded (not written by torchkeep)"
        )
    else:
        print(f"{args.path}: OK, {checked} tensors verified")
    return 0


EXIT_CODES = """exit codes (scan, and inspect of a pickle, have their own 1 and 2: see their --help):
  0    done
  1    refused or failed: the message names the file and the problem
  2    a usage error: a missing or malformed option
  3    a bug in torchkeep (--verbose prints the traceback)
  130  interrupted (Ctrl-C)
  141  the reader of the output went away (torchkeep ls | head)"""
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a tool killed by it: the reader of our output went away (| head)
SCAN_EXIT_CODES = """exit codes:
  0  every pickle in every file was read to its end and imports only allowlisted globals
     (files without pickles, e.g. safetensors with a valid header, count as verified)
  1  something is dangerous: a global that can run code or touch the system (os, subprocess,
     builtins.eval, importlib, torch.load, ...), or one whose name the pickle computes; in a
     .pt2, a shape expression, guard or graph target that reaches Python or the system
  2  nothing dangerous, but something is not verified: a global not on the allowlist
     (unknown), a pickle that is truncated or unreadable, an encrypted member, a compression
     Python cannot read, a compressed stream, a TorchScript archive or a torch.export .pt2
     archive (their loaders run the code they hold), or a limit reached (skipped for size);
     a missing PATH is 2 as well
  1 wins over 2 when both apply."""


def _scan(args: argparse.Namespace) -> int:
    reports, codes = [], []
    for path in args.paths:
        try:
            report = scan(path)
        except TorchkeepError as exc:  # a missing path is not verified: 2, as anything unreadable
            print(f"torchkeep: error: {exc}", file=sys.stderr)
            codes.append(2)
            continue
        reports.append(report)
        codes.append(report.exit_code)
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        for report in reports:
            print(report)
    return 1 if 1 in codes else max(codes, default=0)


def _convert(args: argparse.Namespace) -> int:
    from torchkeep.convert import convert

    bar = Bar("verifying", always=args.progress)
    config = json.loads(args.config) if args.config else None
    if args.command == "consolidate":
        from torchkeep.convert import consolidate

        print(
            consolidate(
                args.src,
                args.dst,
                max_shard_size=args.max_shard_size,
                progress=bar,
                storage_options=args.storage_options,
            )
        )
        return 0
    report = convert(
        args.src,
        args.dst,
        trusted=args.trusted,
        progress=bar,
        config=config,
        max_shard_size=args.max_shard_size,
        sharded=args.sharded,
        key=args.key,
    )
    print(report)
    return 0


def _export(args: argparse.Namespace) -> int:
    from torchkeep.cli.export import run_export

    return run_export(args)


def _diff(args: argparse.Namespace) -> int:
    from torchkeep.weights.diff import diff

    report = diff(args.a, args.b, trusted=args.trusted, progress=Bar("comparing", always=args.progress))
    print(json.dumps(report.to_dict(args.threshold), indent=2) if args.json else report.render(args.threshold))
    return 0 if report.same(args.threshold) else 1


def _report(args: argparse.Namespace) -> int:
    from torchkeep.report import report

    policies = {"keep_last": args.keep_last, "keep_best": args.keep_best, "keep_every": args.keep_every}
    written = report(args.run_dir, args.output, monitor=args.monitor, mode=args.mode, **policies)
    print(f"report written to {written}")
    return 0


def _average(args: argparse.Namespace) -> int:
    from torchkeep.weights.average import average

    sources = args.sources[0] if len(args.sources) == 1 and is_run(args.sources[0]) else args.sources
    bar = Bar("averaging", always=args.progress)
    report = average(sources, args.output, last=args.last, ema=args.ema, trusted=args.trusted, progress=bar)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0


def _demo(args: argparse.Namespace) -> int:
    if args.distributed:
        from torchkeep.cli.demo_distributed import run as run_distributed

        return run_distributed(args.dir or "torchkeep-demo-distributed", storage=args.storage)
    from torchkeep.cli.demo import run

    return run(args.dir or "torchkeep-demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchkeep",
        description="Save, load and inspect PyTorch weights safely.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXIT_CODES,
    )
    parser.add_argument("--verbose", action="store_true", help="on an error, print the traceback too")
    sub = parser.add_subparsers(dest="command", required=True)
    storage_help = "JSON options for fsspec when PATH is a URL (s3://...): credentials, client_kwargs..."
    p = sub.add_parser(
        "inspect",
        help="what a file, folder or URL holds, in any format load reads: its parts, tensors and totals",
        description="Reads headers and pickle structure only (no weight bytes). Safetensors, torch.save files (zip "
        "or legacy, .bin, Lightning .ckpt, the tutorials' dict checkpoints), pytorch_model.bin folders, DCP "
        "folders, NumPy files, torchkeep checkpoints and model folders, TorchScript/.pt2/ONNX. A pickled file's "
        "parts are classified (weights, optimizer per param group, scheduler, scaler, RNG, values) and it is "
        "scanned: exit 0, or the scan's exit code (1 dangerous: never unpickled; 2 unverified). --json: the "
        "schema in docs/CLI.md.",
    )
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--tree", action="store_true", help="parameter counts as a module tree")
    p.add_argument("--storage-options", type=json.loads, default=None, help=storage_help)
    p.set_defaults(func=_inspect)
    p = sub.add_parser(
        "verify",
        help="check weights (a file, folder or URL) or a checkpoint against its checksums",
        description="torchkeep's files: every tensor against its checksum. Other formats have none: they are read "
        "whole as load reads them (pickles through the allowlist, zip CRCs and sizes checked). Exit 0 when good.",
    )
    p.add_argument("path")
    p.add_argument("--storage-options", type=json.loads, default=None, help=storage_help)
    p.add_argument("--progress", action="store_true", help="a progress bar even when small or not on a terminal")
    p.set_defaults(func=_verify)
    p = sub.add_parser(
        "scan",
        help="statically scan every pickle in files or folders, by content (exit 0 safe, 1 dangerous, 2 unverified)",
        description="Read every file by content (never by name) and every pickle in it, without running any: "
        "pickles from byte 0 on (torch legacy, a plain unpickler), every zip member (torch.save, .npz), tar members, "
        ".npy object arrays; safetensors headers are checked.",
        epilog=SCAN_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="files or folders (walked recursively)")
    p.add_argument("--json", action="store_true", help="reports as JSON (status, exit_code, pickles, problems)")
    p.set_defaults(func=_scan)
    p = sub.add_parser("convert", help="convert any readable file to safetensors or a torchkeep checkpoint")
    p.add_argument("src")
    p.add_argument(
        "dst",
        help="a .safetensors file (the weights), or a folder: SRC holding training state (an optimizer, an epoch) "
        "becomes a torchkeep checkpoint folder (a folder holding other files is refused), plain weights "
        "become DST/model.safetensors (--key: only those weights)",
    )
    p.add_argument("--trusted", action="store_true", help="allow full unpickling of SRC (runs its code)")
    p.add_argument("--progress", action="store_true", help="show a progress bar even for small files")
    p.add_argument("--config", help="JSON config for a pickled whole model whose class has none")
    p.add_argument("--max-shard-size", help="weights into a folder: Hugging Face shards of this size (e.g. 2GB)")
    p.add_argument("--key", help="which weights of a checkpoint dict holding several (e.g. state_dict_ema)")
    p.add_argument(
        "--sharded", action="store_true", help="DST: a checkpoint in DCP files that any number of ranks loads sharded"
    )
    p.set_defaults(func=_convert)
    p = sub.add_parser(
        "consolidate", help="a distributed (DCP) checkpoint's model as one safetensors file or a Hugging Face folder"
    )
    p.add_argument("src", help="a checkpoint saved by several ranks, or a torch.distributed.checkpoint folder")
    p.add_argument("dst", help="a .safetensors file, or a folder")
    p.add_argument("--max-shard-size", help="a folder of Hugging Face shards of this size (e.g. 2GB)")
    p.add_argument("--progress", action="store_true", help="show a progress bar even for small files")
    p.add_argument("--storage-options", type=json.loads, default=None, help=storage_help)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.set_defaults(func=_convert)
    p = sub.add_parser(
        "export",
        help="export a save_model folder to ONNX, torch.export (.pt2) or TorchScript, verified against eager mode",
        description="Load MODEL_DIR (a save_model folder), export it with random example inputs of the given "
        "shapes, run the artifact in its own runtime and compare it with eager mode. Exit 0 when verified.",
    )
    p.add_argument("model_dir")
    p.add_argument("output", help="the artifact file: model.onnx, model.pt2, model.pt")
    p.add_argument("--format", choices=["onnx", "exported_program", "torchscript"], help="default: by OUTPUT's suffix")
    p.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="[NAME=]SHAPE[:DTYPE]",
        help="an example input, e.g. 1,3,224,224 or ids=2,16:int64 (repeat for several; NAME= makes it a keyword). "
        "Default for a model that starts with a Linear layer: 2,in_features",
    )
    p.add_argument("--static-batch", action="store_true", help="fix the batch size instead of making it symbolic")
    p.add_argument("--no-verify", action="store_true", help="skip running the artifact")
    p.add_argument("--rtol", type=float)
    p.add_argument("--atol", type=float)
    p.add_argument("--allow-module", action="append", default=[], help="a module whose model classes may be imported")
    p.add_argument("--json", action="store_true", help="print the report as JSON (the I/O spec with the errors)")
    p.set_defaults(func=_export)
    p = sub.add_parser(
        "diff",
        help="compare two sets of weights in any formats: keys, shapes, relative change per tensor and module",
        description="Exit 0 when A and B hold the same keys, shapes and dtypes and no tensor changed by more than "
        "--threshold (relative: ||a-b|| / ||a||); 1 otherwise. module./_orig_mod. prefixes are ignored.",
    )
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument(
        "--threshold", type=float, default=0.0, help="relative change at or below which a tensor counts as same"
    )
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--trusted", action="store_true", help="allow full unpickling of pickle-based files (runs their code)"
    )
    p.add_argument("--progress", action="store_true", help="a progress bar even when small or not on a terminal")
    p.set_defaults(func=_diff)
    p = sub.add_parser(
        "average",
        help="average the weights of checkpoints (a run's last N, or files of any format) into one safetensors file",
        description="Floating-point tensors are averaged in float64 and cast back; integer tensors (counters) "
        "come from the newest source. Sources are oldest first; a run directory gives its checkpoints by step.",
    )
    p.add_argument("sources", nargs="+", help="a CheckpointManager run directory, or checkpoint/weight files")
    p.add_argument("-o", "--output", required=True, help="the .safetensors file to write")
    p.add_argument("--last", type=int, default=None, help="only the newest N sources")
    p.add_argument("--ema", type=float, default=None, help="an exponential moving average with this decay")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--trusted", action="store_true", help="allow full unpickling of pickle-based files (runs their code)"
    )
    p.add_argument("--progress", action="store_true", help="a progress bar even when small or not on a terminal")
    p.set_defaults(func=_average)
    p = sub.add_parser(
        "ls",
        help="list a CheckpointManager directory or URL (steps, times, sizes, metrics), or what each file in "
        "any other folder is",
    )
    p.add_argument("directory")
    p.add_argument("--json", action="store_true")
    p.add_argument("--monitor", help="metric that marks the best checkpoint")
    p.add_argument("--mode", default="min", choices=["min", "max"])
    p.add_argument("--storage-options", type=json.loads, default=None, help=storage_help)
    p.set_defaults(func=_ls)
    p = sub.add_parser(
        "report",
        help="one self-contained HTML page about a CheckpointManager run: checkpoints, metric curves, sizes, changes",
        description="A run does not record its manager's retention options: pass them to see which policy keeps "
        "each checkpoint, and --monitor to mark the best.",
    )
    p.add_argument("run_dir")
    p.add_argument("-o", "--output", default="report.html", help="the HTML file to write (default report.html)")
    p.add_argument("--monitor", help="metric that marks the best checkpoint")
    p.add_argument("--mode", default="min", choices=["min", "max"])
    p.add_argument("--keep-last", type=int, help="the run's keep_last, to show what it keeps")
    p.add_argument("--keep-best", type=int, help="the run's keep_best (needs --monitor)")
    p.add_argument("--keep-every", type=int, help="the run's keep_every")
    p.set_defaults(func=_report)
    p = sub.add_parser("demo", help="train the Iris classifier, save, load and partially load it")
    p.add_argument("--dir", default=None, help="folder to write into (default ./torchkeep-demo[-distributed])")
    p.add_argument(
        "--distributed", action="store_true", help="2 gloo ranks with FSDP2: kill one, resume, reshard to 1 process"
    )
    p.add_argument("--storage", choices=("local", "s3"), default="local", help="with --distributed: s3 also "
                   "publishes the weights to a local S3 server (needs moto and s3fs)")  # fmt: skip
    p.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # here, not at exit: a reader gone by now is answered below, not by a traceback
        return code
    except BrokenPipeError:
        with contextlib.suppress(OSError, ValueError):  # nothing more can reach the reader: say nothing
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except TorchkeepError as exc:
        print(f"torchkeep: error: {exc}", file=sys.stderr)
        _detail(args)
        return 1
    except ValueError as exc:  # the API's refusal of an option's value (--keep-last 0, --ema 1): a usage error
        print(f"torchkeep: error: {exc}", file=sys.stderr)
        _detail(args)
        return 2
    except KeyboardInterrupt:
        print("torchkeep: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: one line, never a traceback unless asked
        print(
            f"torchkeep: internal error: {type(exc).__name__}: {exc} (this is a bug in torchkeep; please report it, "
            "with the output of --verbose)",
            file=sys.stderr,
        )
        _detail(args)
        return 3


def _detail(args: argparse.Namespace) -> None:
    if getattr(args, "verbose", False):
        traceback.print_exc(file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
