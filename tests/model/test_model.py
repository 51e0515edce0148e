"""save_model / load_model: round trips, fresh processes, refusal without import, memory, interop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import safetensors.torch as st
import torch
from torch import nn

import torchkeep
from tests.conftest import assert_same_tensors
from tests.model.models_for_tests import CNN, Block, DataclassMLP, MLPConfig, TiedLM

ROOT = Path(__file__).parents[2]
ALLOW = ["tests.model.models_for_tests"]


def run_child(script: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT
    )


def test_dataclass_config_mlp_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = DataclassMLP(MLPConfig(blocks=[Block(8, 0.1), Block(5)], classes=4), scale=2.0).eval()
    torchkeep.save_model(model, tmp_path / "mlp")
    config = json.loads((tmp_path / "mlp" / "config.json").read_text())
    assert config == {
        "config": {"inputs": 4, "blocks": [{"width": 8, "dropout": 0.1}, {"width": 5, "dropout": 0.0}], "classes": 4},
        "scale": 2.0,
    }
    loaded = torchkeep.load_model(tmp_path / "mlp")
    assert isinstance(loaded, DataclassMLP) and not loaded.training
    assert loaded.config == model.config and isinstance(loaded.config.blocks[0], Block)
    x = torch.randn(3, 4)
    assert torch.equal(model(x), loaded(x))


def test_cnn_with_batchnorm_via_get_config(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = CNN(channels=3, classes=5)
    model.train()
    model(torch.randn(8, 1, 6, 6))
    model.eval()
    torchkeep.save_model(model, tmp_path / "cnn")
    loaded = torchkeep.load_model(tmp_path / "cnn", cls=CNN)
    assert_same_tensors(model.state_dict(), loaded.state_dict())
    x = torch.randn(2, 1, 6, 6)
    assert torch.equal(model(x), loaded(x))


def test_tied_weights_stay_tied(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = TiedLM({"vocab": 20, "dim": 6}).eval()
    torchkeep.save_model(model, tmp_path / "lm")
    loaded = torchkeep.load_model(tmp_path / "lm", cls=TiedLM)
    assert loaded.head.weight is loaded.embed.weight
    ids = torch.tensor([[1, 5, 7]])
    assert torch.equal(model(ids), loaded(ids))


def test_sequential_of_stock_layers_needs_no_class(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.GELU(approximate="tanh"),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 16),
        nn.LayerNorm(16),
        nn.Dropout(0.2),
        nn.Sequential(nn.Linear(16, 3), nn.LogSoftmax(dim=1)),
    ).eval()
    torchkeep.save_model(model, tmp_path / "seq")
    manifest = json.loads((tmp_path / "seq" / "torchkeep_model.json").read_text())
    assert manifest["class"] is None and manifest["config_source"] == "stock"
    loaded = torchkeep.load_model(tmp_path / "seq")
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(model(x), loaded(x))


def test_model_without_a_config_is_refused_with_guidance(tmp_path: Path) -> None:
    class Plain(nn.Module):
        def __init__(self, width: int) -> None:  # a required argument: no config can be guessed
            super().__init__()
            self.fc = nn.Linear(2, width)

    with pytest.raises(ValueError, match="register_model"):
        torchkeep.save_model(Plain(2), tmp_path / "plain")
    assert not (tmp_path / "plain").exists()


def test_load_in_a_fresh_process(tmp_path: Path) -> None:
    torch.manual_seed(4)
    model = CNN(channels=2, classes=3).eval()
    torchkeep.save_model(model, tmp_path / "cnn")
    x = torch.randn(2, 1, 5, 5)
    torch.save(x, tmp_path / "x.pt")
    torchkeep.save({"y": model(x).detach()}, tmp_path / "y.safetensors")
    done = run_child(f"""
        import sys, torch, torchkeep
        model = torchkeep.load_model({str(tmp_path / "cnn")!r}, allow_modules={ALLOW!r})
        x = torch.load({str(tmp_path / "x.pt")!r}, weights_only=True)
        expected = torchkeep.load({str(tmp_path / "y.safetensors")!r})["y"]
        print("same" if torch.equal(model(x), expected) and not model.training else "different")
    """)
    assert done.stdout.strip() == "same", done.stderr


def test_a_class_that_is_not_allowed_is_refused_without_importing_it(tmp_path: Path) -> None:
    from tests.model.forbidden_module import Forbidden

    torchkeep.save_model(Forbidden(), tmp_path / "f")
    done = run_child(f"""
        import sys, torchkeep
        try:
            torchkeep.load_model({str(tmp_path / "f")!r})
        except torchkeep.UnsafeCheckpointError as exc:
            print("refused:", exc)
        print("imported" if "tests.model.forbidden_module" in sys.modules else "not imported")
    """)
    out = done.stdout
    assert "refused:" in out and "not imported" in out, done.stderr
    assert "tests.model.forbidden_module:Forbidden" in out
    assert "cls=" in out and "register_model" in out and "allow_modules" in out


def test_dtype_device_and_mode_options(tmp_path: Path) -> None:
    model = DataclassMLP(MLPConfig())
    torchkeep.save_model(model, tmp_path / "m")
    half = torchkeep.load_model(tmp_path / "m", dtype=torch.float16, eval=False)
    assert half.training and all(p.dtype == torch.float16 for p in half.parameters())
    assert all(p.device.type == "cpu" for p in half.parameters())


def test_weights_that_do_not_fit_the_config(tmp_path: Path) -> None:
    torchkeep.save_model(DataclassMLP(MLPConfig()), tmp_path / "m")
    config_file = tmp_path / "m" / "config.json"
    config = json.loads(config_file.read_text())
    config["config"]["classes"] = 7
    config_file.write_text(json.dumps(config))
    with pytest.raises(torchkeep.LoadMismatchError, match=r"head\.weight"):
        torchkeep.load_model(tmp_path / "m")


def test_saved_directory_is_readable_with_plain_safetensors_and_json(tmp_path: Path) -> None:
    model = CNN(channels=2, classes=3).eval()
    torchkeep.save_model(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    rebuilt = CNN(**config)
    rebuilt.load_state_dict(st.load_file(tmp_path / "m" / "model.safetensors"))
    rebuilt.eval()
    x = torch.randn(1, 1, 5, 5)
    assert torch.equal(model(x), rebuilt(x))


def test_hugging_face_mixin_directories(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from huggingface_hub import PyTorchModelHubMixin

    class HubNet(nn.Module, PyTorchModelHubMixin):  # type: ignore[misc]
        def __init__(self, hidden: int = 4, classes: int = 2) -> None:
            super().__init__()
            self.fc1 = nn.Linear(3, hidden)
            self.fc2 = nn.Linear(hidden, classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(5)
    model = HubNet(hidden=6, classes=3).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "hub")
    loaded = torchkeep.load_model(tmp_path / "hub", cls=HubNet)
    x = torch.randn(2, 3)
    assert torch.equal(model(x), loaded(x))
    with pytest.raises(torchkeep.UnsafeCheckpointError, match="cls="):
        torchkeep.load_model(tmp_path / "hub")


def test_peak_memory_of_a_one_gib_model_load(tmp_path: Path) -> None:
    from tests.model.models_for_tests import Big

    with torch.device("meta"):
        meta = Big()
    weights = sum(p.numel() * p.element_size() for p in meta.parameters())
    assert weights == 4 * 8192 * 8192 * 4  # 1 GiB
    state = {f"net.{i}.weight": torch.full((8192, 8192), float(i)) for i in range(4)}
    target = tmp_path / "big"
    target.mkdir()
    torchkeep.save(state, target / "model.safetensors")
    del state
    (target / "config.json").write_text(json.dumps({"width": 8192, "layers": 4}))
    (target / "torchkeep_model.json").write_text(
        json.dumps(
            {
                "format": "torchkeep.model",
                "version": 1,
                "class": "tests.model.models_for_tests:Big",
                "config_source": "get_config",
                "structure": None,
            }
        )
    )
    torchkeep.save_model(Big(width=8, layers=1), tmp_path / "warm")
    done = run_child(f"""
        import torch, torchkeep
        def rss(key):
            return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
        torchkeep.load_model({str(tmp_path / "warm")!r}, allow_modules={ALLOW!r})  # first-use costs
        base = rss("VmRSS")
        model = torchkeep.load_model({str(target)!r}, allow_modules={ALLOW!r})
        assert float(model.net[3].weight[0, 0]) == 3.0
        print((rss("VmHWM") - base) / {weights})
    """)
    assert done.returncode == 0, done.stderr
    ratio = float(done.stdout.strip().splitlines()[-1])
    assert ratio <= 1.2, f"peak RSS grew {ratio:.2f}x the weights"


def test_convert_a_pickled_whole_model_to_a_model_directory(tmp_path: Path) -> None:
    torch.manual_seed(6)
    model = CNN(channels=2, classes=4).eval()
    torch.save(model, tmp_path / "whole.pth")  # the tutorials' torch.save(model)
    with pytest.raises(torchkeep.UnsafeCheckpointError):
        torchkeep.convert(tmp_path / "whole.pth", tmp_path / "out")
    with pytest.warns(torchkeep.TorchkeepWarning):
        report = torchkeep.convert(tmp_path / "whole.pth", tmp_path / "out", trusted=True)
    assert report.kind == "model"
    loaded = torchkeep.load_model(tmp_path / "out", allow_modules=ALLOW)
    x = torch.randn(2, 1, 5, 5)
    assert torch.equal(model(x), loaded(x))


def test_convert_cli_with_a_config_and_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.model.forbidden_module import Forbidden
    from torchkeep.cli.main import main

    class NoConfig(Forbidden):  # the protocol disabled: a config must be given
        get_config = None  # type: ignore[assignment]

    torch.save(Forbidden(width=5), tmp_path / "f.pth")
    with pytest.warns(torchkeep.TorchkeepWarning, match="trusted=True"):
        assert main(["convert", str(tmp_path / "f.pth"), str(tmp_path / "fdir"), "--trusted"]) == 0
    assert "model" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "fdir")]) == 0
    out = capsys.readouterr().out
    assert "tests.model.forbidden_module:Forbidden" in out and '{"width": 5}' in out and "fc.weight" in out
    model = NoConfig(width=2)
    with pytest.raises(ValueError, match="config"):
        torchkeep.save_model(model, tmp_path / "nc")
    torchkeep.save_model(model, tmp_path / "nc", config={"width": 2})
    assert torchkeep.load_model(tmp_path / "nc", cls=NoConfig).fc.in_features == 2


def test_large_models_are_sharded(tmp_path: Path) -> None:
    torch.manual_seed(7)
    model = DataclassMLP(MLPConfig(inputs=64, blocks=[Block(64), Block(64)], classes=8)).eval()
    torchkeep.save_model(model, tmp_path / "m", max_shard_size=20_000)
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert "model.safetensors.index.json" in names and sum(n.startswith("model-0") for n in names) >= 2
    loaded = torchkeep.load_model(tmp_path / "m")
    x = torch.randn(2, 64)
    assert torch.equal(model(x), loaded(x))
