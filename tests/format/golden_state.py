"""The state behind tests/format/golden/*.safetensors: regenerate only for a new format version."""

from __future__ import annotations

import torch


def golden_state() -> dict[str, torch.Tensor]:
    emb = torch.arange(12, dtype=torch.float32).reshape(4, 3) / 8
    return {
        "embed.weight": emb,
        "head.weight": emb,  # tied: stored once, as an alias
        "bn.running_mean": torch.tensor([0.5, -1.25, 3.0], dtype=torch.float64),
        "bn.num_batches_tracked": torch.tensor(7),
        "half": torch.tensor([1.5, -2.0], dtype=torch.float16),
        "brain": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.tensor([0, 255, 7], dtype=torch.uint8),
        "empty": torch.empty(0, 2),
    }


GOLDEN_METADATA = {"epoch": "3", "note": "golden v1"}
