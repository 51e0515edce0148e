"""Warnings that point at the caller's line, however deep in torchkeep they are raised."""

from __future__ import annotations

import os
import sys
import warnings

from torchkeep.errors import TorchkeepWarning

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn(message: str, category: type[Warning] = TorchkeepWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside torchkeep (a decorator or a helper in
    between would otherwise make the warning name a torchkeep file)."""
    frame, level = sys._getframe(0), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    warnings.warn(message, category, stacklevel=level)
