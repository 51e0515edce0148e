"""A corpus of malicious files, built by the tests. Every payload only creates a marker file.

Techniques: os.system, subprocess, builtins eval/exec/open/getattr/__import__, importlib, runpy,
functools.partial, operator.attrgetter/methodcaller, pickle.loads, torch.load and numpy.load
gadgets, payloads nested in optimizer state and hyper_parameters, a malicious data.pkl in an
otherwise valid zip, the legacy torch format, NumPy object arrays, and pickle protocols 0-5.
"""

from __future__ import annotations

import builtins
import functools
import importlib
import io
import operator
import os
import pickle
import runpy
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch


class Reduce:
    """Pickles as ``fn(*args)``: the shape of every pickle exploit."""

    def __init__(self, fn: Any, *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.fn, self.args

    def __call__(self, *args: Any) -> Any:  # pickle wants reduce's callable to be callable
        raise AssertionError("never called while pickling")


def _py_touch(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


def _sh_touch(marker: Path) -> str:
    return f"touch {marker}"


def _os_module() -> Reduce:
    return Reduce(importlib.import_module, "os")


def payloads(marker: Path, workdir: Path) -> dict[str, tuple[Any, int]]:
    """name -> (object to pickle, pickle protocol)."""
    script = workdir / "payload_script.py"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n")
    inner = workdir / "inner_evil.pt"
    inner.write_bytes(pickle.dumps(Reduce(os.system, _sh_touch(marker)), protocol=2))
    inner_npy = workdir / "inner_evil.npy"
    np.save(inner_npy, np.array([Reduce(os.system, _sh_touch(marker))], dtype=object), allow_pickle=True)
    return {
        "os_system_p0": (Reduce(os.system, _sh_touch(marker)), 0),
        "os_system_p1": (Reduce(os.system, _sh_touch(marker)), 1),
        "os_system_p2": (Reduce(os.system, _sh_touch(marker)), 2),
        "os_system_p4": (Reduce(os.system, _sh_touch(marker)), 4),
        "os_system_p5": (Reduce(os.system, _sh_touch(marker)), 5),
        "subprocess_call": (Reduce(subprocess.call, ["touch", str(marker)]), 4),
        "subprocess_check_output": (Reduce(subprocess.check_output, ["touch", str(marker)]), 2),
        "builtins_eval": (Reduce(builtins.eval, _py_touch(marker)), 4),
        "builtins_exec": (Reduce(builtins.exec, _py_touch(marker)), 2),
        "builtins_open": (Reduce(builtins.open, str(marker), "w"), 4),
        "builtins_getattr_chain": (Reduce(Reduce(builtins.getattr, _os_module(), "system"), _sh_touch(marker)), 4),
        "builtins_import": (
            Reduce(Reduce(builtins.getattr, Reduce(builtins.__import__, "os"), "system"), _sh_touch(marker)),
            2,
        ),
        "importlib_import_module": (Reduce(Reduce(getattr, _os_module(), "system"), _sh_touch(marker)), 3),
        "runpy_run_path": (Reduce(runpy.run_path, str(script)), 4),
        "functools_partial": (Reduce(functools.partial(os.system, _sh_touch(marker))), 4),
        "operator_attrgetter": (Reduce(Reduce(operator.attrgetter("system"), _os_module()), _sh_touch(marker)), 4),
        "operator_methodcaller": (Reduce(operator.methodcaller("system", _sh_touch(marker)), _os_module()), 2),
        "pickle_loads": (Reduce(pickle.loads, pickle.dumps(Reduce(os.system, _sh_touch(marker)))), 4),
        "torch_load_gadget": (Reduce(functools.partial(torch.load, str(inner), weights_only=False)), 4),
        "numpy_load_gadget": (Reduce(functools.partial(np.load, str(inner_npy), allow_pickle=True)), 4),
        "in_optimizer_state": (
            {
                "model_state_dict": {"w": torch.ones(2)},
                "optimizer_state_dict": {
                    "state": {0: {"exp_avg": Reduce(os.system, _sh_touch(marker))}},
                    "param_groups": [],
                },
            },
            2,
        ),
        "in_hyper_parameters": (
            {
                "state_dict": {"w": torch.ones(2)},
                "epoch": 3,
                "hyper_parameters": {"lr": 0.1, "cb": Reduce(builtins.eval, _py_touch(marker))},
            },
            4,
        ),
        "beside_real_weights": ({"w": torch.randn(3), "x": Reduce(os.system, _sh_touch(marker))}, 2),
    }


def write_corpus(directory: Path, marker: Path) -> dict[str, Path]:
    """Every malicious file, by name; at least 25."""
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for name, (obj, protocol) in payloads(marker, directory).items():
        raw = directory / f"{name}.pkl"
        raw.write_bytes(pickle.dumps(obj, protocol=protocol))
        files[f"{name}.pkl"] = raw
        if name in (
            "os_system_p2",
            "in_optimizer_state",
            "in_hyper_parameters",
            "beside_real_weights",
            "torch_load_gadget",
        ):
            archive = directory / f"{name}.pt"
            torch.save(obj, archive, pickle_protocol=max(protocol, 2))
            files[f"{name}.pt"] = archive
            legacy = directory / f"{name}.legacy.pth"
            torch.save(obj, legacy, _use_new_zipfile_serialization=False, pickle_protocol=max(protocol, 2))
            files[f"{name}.legacy.pth"] = legacy
    files["swapped_data_pkl.pt"] = _swap_data_pkl(directory, marker)
    files["object_array.npy"] = directory / "object_array.npy"
    np.save(
        files["object_array.npy"], np.array([Reduce(os.system, _sh_touch(marker))], dtype=object), allow_pickle=True
    )
    files["object_array.npz"] = directory / "object_array.npz"
    np.savez(
        files["object_array.npz"], ok=np.ones(2), bad=np.array([Reduce(os.system, _sh_touch(marker))], dtype=object)
    )
    files["legacy_evil_sys_info.pt"] = _legacy_with_evil_header(directory, marker)
    return files


def _swap_data_pkl(directory: Path, marker: Path) -> Path:
    """A valid torch.save archive of real weights whose data.pkl is replaced by an exploit."""
    benign = directory / "benign_for_swap.pt"
    torch.save({"w": torch.randn(4)}, benign)
    target = directory / "swapped_data_pkl.pt"
    with zipfile.ZipFile(benign) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                data = pickle.dumps({"w": Reduce(os.system, _sh_touch(marker))}, protocol=2)
            dst.writestr(info, data)
    benign.unlink()
    return target


def _legacy_with_evil_header(directory: Path, marker: Path) -> Path:
    """The legacy format, with the exploit hidden in the sys_info pickle instead of the object."""
    buf = io.BytesIO()
    for value in (0x1950A86A20F9469CFC6C, 1001, Reduce(os.system, _sh_touch(marker)), {"w": 1}, []):
        pickle.dump(value, buf, protocol=2)
    path = directory / "legacy_evil_sys_info.pt"
    path.write_bytes(buf.getvalue())
    return path


LoadFn = Callable[[Path], Any]
