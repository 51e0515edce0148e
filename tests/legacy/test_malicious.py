"""No pickled code runs by default: every malicious file is refused by every load function, and flagged."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep
from tests.legacy.corpus import write_corpus
from torchkeep.cli.main import main


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], Path]:
    root = tmp_path_factory.mktemp("corpus")
    marker = root / "MARKER"
    files = write_corpus(root / "files", marker)
    assert len(files) >= 25
    return files, marker


def test_the_corpus_is_really_malicious(corpus: tuple[dict[str, Path], Path]) -> None:
    """Control: with plain pickle / torch.load(weights_only=False) / np.load(allow_pickle=True), each file runs."""
    files, marker = corpus
    script = textwrap.dedent(f"""
        import json, os, pickle, sys, time, numpy as np, torch
        marker = {str(marker)!r}
        ran = []
        for name, path in json.loads(sys.argv[1]).items():
            try:
                if path.endswith((".npy", ".npz")):
                    loaded = np.load(path, allow_pickle=True)
                    if hasattr(loaded, "files"):
                        [loaded[k] for k in loaded.files]
                elif path.endswith((".pt", ".pth")):
                    torch.load(path, weights_only=False)
                else:
                    with open(path, "rb") as f:
                        pickle.load(f)
            except Exception:
                pass
            for _ in range(50):
                if os.path.exists(marker):
                    break
                time.sleep(0.01)
            if os.path.exists(marker):
                ran.append(name)
                os.remove(marker)
        print(json.dumps(ran))
    """)
    payload = json.dumps({name: str(path) for name, path in files.items()})
    done = subprocess.run([sys.executable, "-c", script, payload], capture_output=True, text=True, timeout=300)
    ran = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert ran == set(files), f"payloads that did not fire: {sorted(set(files) - ran)}"
    assert not marker.exists()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))


LOADERS = {
    "load": lambda p: torchkeep.load(p),
    "load_raw": lambda p: torchkeep.load_raw(p),
    "load_into": lambda p: torchkeep.load_into(Net(), p),
    "load_checkpoint": lambda p: torchkeep.load_checkpoint(p, model=Net()),
}


@pytest.mark.parametrize("loader", list(LOADERS))
def test_every_load_function_refuses_every_malicious_file(corpus: tuple[dict[str, Path], Path], loader: str) -> None:
    files, marker = corpus
    for name, path in files.items():
        with pytest.raises(torchkeep.UnsafeCheckpointError) as info:
            LOADERS[loader](path)
        assert str(path) in str(info.value), name
        assert not marker.exists(), f"{name} ran code through {loader}"


def test_refusal_names_every_refused_global_and_the_way_out(corpus: tuple[dict[str, Path], Path]) -> None:
    files, _ = corpus
    with pytest.raises(torchkeep.UnsafeCheckpointError) as info:
        torchkeep.load(files["operator_methodcaller.pkl"])
    assert set(info.value.globals) >= {"operator.methodcaller", "importlib.import_module"}
    assert "trusted=True" in str(info.value)


def test_scan_flags_every_malicious_file_as_dangerous(corpus: tuple[dict[str, Path], Path]) -> None:
    files, marker = corpus
    for name, path in files.items():
        report = torchkeep.scan(path)
        assert report.verdict == "dangerous", f"{name}: {report}"
    assert not marker.exists()


def test_scan_cli_gates_on_dangerous(corpus: tuple[dict[str, Path], Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    files, _ = corpus
    assert main(["scan", str(files["os_system_p4.pkl"].parent)]) == 1
    assert "DANGEROUS" in capsys.readouterr().out
    benign = tmp_path / "ok.pt"
    torch.save({"w": torch.ones(2)}, benign)
    assert main(["scan", str(benign), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["verdict"] == "safe"
