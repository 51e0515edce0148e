"""torchkeep.report: one self-contained HTML page about a CheckpointManager run directory.

The page shows the checkpoints (step, time, size, metrics, latest / best, what keeps each), a chart per
metric, the latest model's bytes by module (a treemap) and by dtype, and how much each module changed
between the last two checkpoints (a heat map). It is one file with inline CSS and SVG, no script, and
fetches nothing: open it offline, attach it to an issue, archive it with the run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from torchkeep.manager.manager import CheckpointManager
from torchkeep.manager.policies import RetentionPolicy
from torchkeep.report.collect import collect
from torchkeep.report.html import page
from torchkeep.storage.local import atomic_write, write_errors

__all__ = ["report"]


def report(
    run_dir: str | os.PathLike[str],
    output: str | os.PathLike[str] = "report.html",
    *,
    keep_last: int | None = None,
    keep_best: int | None = None,
    monitor: str | None = None,
    mode: str = "min",
    keep_every: int | None = None,
    policies: Sequence[RetentionPolicy] = (),
    template: str = "step-{step:08d}",
) -> Path:
    """Write an HTML report of the run at ``run_dir`` to ``output``; the run is only read.

    A run does not record its manager's options, so pass the ones it was made with (the same
    keywords as :class:`~torchkeep.CheckpointManager`) to see the best checkpoint and which
    retention policy keeps each; without them the page says they are unknown.

    Args:
        run_dir: a CheckpointManager directory.
        output: the HTML file to write (replaced atomically).
        keep_last, keep_best, monitor, mode, keep_every, policies, template: as for CheckpointManager.

    Returns:
        The path written.

    Raises:
        CheckpointNotFoundError: ``run_dir`` is missing or holds no checkpoint.
        ValueError: invalid policy options (e.g. ``keep_best`` without ``monitor``).

    Example:
        >>> torchkeep.report("runs/1", "runs/1/report.html", keep_last=2, keep_best=1, monitor="val_loss")
    """
    from torchkeep import __version__

    manager = CheckpointManager(
        run_dir,
        read_only=True,
        keep_last=keep_last,
        keep_best=keep_best,
        monitor=monitor,
        mode=mode,
        keep_every=keep_every,
        policies=policies,
        template=template,
    )
    summary = collect(manager, template)
    target = Path(output)
    with write_errors(target.parent, "creating the folder"):  # as every save does
        target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(target) as sink:  # a reader (a browser reloading it) never sees half a page
        sink.write(page(summary, version=__version__).encode("utf-8"))
    return target
