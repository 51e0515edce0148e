"""load_into reads straight into the model's own tensors: no second copy of the weights is ever allocated."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from torch import nn

import torchkeep

CHILD = textwrap.dedent("""
    import json, sys, threading, time, torch
    from torch import nn
    import torchkeep

    def anon() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    torch.set_num_threads(1)
    model = nn.Sequential(*[nn.Linear(2048, 2048, bias=False) for _ in range(16)])  # 256 MiB
    for p in model.parameters():
        p.data.fill_(1.0)  # fault every page in now
    peak, done = [anon()], threading.Event()
    def sample() -> None:
        while not done.is_set():
            peak.append(anon())
            time.sleep(0.0005)
    sampler = threading.Thread(target=sample)
    base = anon()
    sampler.start()
    report = torchkeep.load_into(model, sys.argv[1], verify=sys.argv[2] == "verify")
    done.set()
    sampler.join()
    same = all(torch.equal(p, torch.full_like(p, 2.0)) for p in model.parameters())
    print(json.dumps({"extra": max(peak) - base, "ok": report.ok, "same": same}))
""")


def test_load_into_allocates_no_copy_of_the_weights(tmp_path: Path) -> None:
    model = nn.Sequential(*[nn.Linear(2048, 2048, bias=False) for _ in range(16)])
    for p in model.parameters():
        p.data.fill_(2.0)
    path = tmp_path / "w.safetensors"
    torchkeep.save(model, path)
    weights = 16 * 2048 * 2048 * 4
    for mode in ("verify", "no-verify"):
        done = subprocess.run([sys.executable, "-c", CHILD, str(path), mode], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["ok"] and result["same"]
        assert result["extra"] <= 0.05 * weights, f"{mode}: {result['extra'] / 2**20:.1f} MiB more anonymous memory"


def test_a_damaged_tensor_is_found_before_any_parameter_changes(tmp_path: Path) -> None:
    source = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    path = tmp_path / "w.safetensors"
    torchkeep.save(source, path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # the last tensor's bytes (the file is laid out in key order)
    path.write_bytes(bytes(data))
    target = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    try:
        torchkeep.load_into(target, path)
    except torchkeep.CorruptCheckpointError as exc:
        assert "checksum mismatch" in str(exc)
    else:
        raise AssertionError("a flipped bit was not found")
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_load_is_mapped_and_verified_by_default_and_a_copy_when_cast(tmp_path: Path) -> None:
    from torchkeep import _config

    state = {f"w{i}": torch.randn(256, 1024) for i in range(80)}  # 80 MiB: hashed in parallel
    path = tmp_path / "w.safetensors"
    torchkeep.save(state, path)
    before = path.read_bytes()
    loaded = torchkeep.load(path)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    loaded["w0"].add_(1.0)  # a private mapping: the file never changes
    assert path.read_bytes() == before
    assert torchkeep.load(path, dtype=torch.float16)["w1"].dtype == torch.float16

    data = bytearray(before)
    data[-5] ^= 0x10  # in the last tensor, which the second hashing thread checks
    path.write_bytes(bytes(data))
    assert _config.PARALLEL_HASH_BYTES < 80 << 20
    for mmap in (None, False):
        try:
            torchkeep.load(path, mmap=mmap)
        except torchkeep.CorruptCheckpointError as exc:
            assert exc.key == "w79"
        else:
            raise AssertionError(f"mmap={mmap}: a flipped bit was not found")
    assert torchkeep.load(path, mmap=True)["w79"].shape == (256, 1024)  # lazy: structure only, as documented
