from __future__ import annotations

from pathlib import Path

import pytest

from torchkeep.cli.main import main


@pytest.mark.slow
def test_distributed_demo_kills_a_rank_resumes_bit_exactly_and_reshards(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--distributed", "--storage", "s3", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "latest is still step-00000030" in out
    assert "final weights bit-identical to the uninterrupted run: True" in out
    assert "read back and verified: True" in out
    assert (tmp_path / "iris-fsdp.safetensors").is_file()
    assert (tmp_path / "run" / "latest").read_text().strip() == "step-00000060"
