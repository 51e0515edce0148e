"""The CLI reference (docs/CLI.md), generated from the parser's own --help, so it cannot drift.

    .venv/bin/python -m torchkeep.cli.reference > docs/CLI.md

tests/cli/test_cli_reference.py fails when docs/CLI.md differs from what this prints.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager

from torchkeep.cli.main import build_parser

WIDTH = "100"  # argparse wraps to $COLUMNS: fixed, so the text is the same on every terminal


@contextmanager
def _columns() -> Iterator[None]:
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        yield
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before


JSON_SCHEMAS = """## --json output

Keys present in every case are listed plainly; `?` marks keys present only for some inputs. Sizes are bytes.

`torchkeep inspect --json` of weights or any file `load` reads:
`path`, `format` (what the file is), `files`, `file_bytes`, `checksummed` (torchkeep's xxh3 per tensor),
`metadata`, `total_tensors`, `total_params`, `total_bytes`, `params_by_prefix` ({module: elements}),
`aliases` ({name: name it shares storage with}), `tensors` ([{`name`, `dtype`, `shape`, `numel`, `bytes`,
`file`, `alias_of`}]);
`contents`? (pickled files, DCP folders, NumPy: {`layout`, `weights_key`, `parts`: [{`key`, `role`
(weights, optimizer, scheduler, scaler, rng, value, tensor, other), `summary`, `detail`}]}; an optimizer's
`detail` holds `param_groups` ([{`params`: count, hyper-parameters...}]), `params_with_state`, `slots`,
`state_bytes`);
`scan`? (pickle-based files: {`status`, `exit_code`, `summary`});
`kind`?, `inputs`?, `outputs`?, `notes`? (TorchScript, .pt2, ONNX); `export_spec`? (beside an export).

`torchkeep inspect --json` of a torchkeep checkpoint: `path`, `format`, `torch`, `torchkeep`, `created`,
`objects`, `info`, `state`, `tensors`, `total_bytes`, `distributed`? ({`world_size`, `sharded_tensors`,
`sharded_bytes`, `dcp_files`}). Of a model folder: `path`, `manifest`, `config`, and the weights' keys.

`torchkeep diff --json`: `a`, `b`, `identical`, `same_within_threshold`, `threshold`, `only_in_a`,
`only_in_b`, `mismatched` ([{`name`, `a`, `b`}]), `tensors` ([{`name`, `relative`, `max_abs`}]), `modules`
({module: {`tensors`, `changed`, `max_relative`}}).

`torchkeep average --json`: `output`, `sources`, `method` (`mean` or `ema(decay)`), `averaged`, `copied`.

`torchkeep ls --json` of a run: `checkpoints` ([{`step`, `path`, `time`, `size`, `metrics`, `latest`, `best`}]),
`damaged` ({name: why}); of any other folder: `files` ([{`name`, `size`, `tensors`, `what`}]).

`torchkeep scan --json`: a list, one per path: `path`, `status`, `exit_code`, `verdict`, `files_scanned`,
`files`, `pickles` ([{`location`, `status`, `verdict`, `complete`, `error`, `globals`}]), `problems`.
"""


def reference() -> str:
    """Markdown: the top-level help, then each command's full help, in the parser's order."""
    with _columns():
        parser = build_parser()
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        lines = [
            "# torchkeep command line",
            "",
            "Generated from `torchkeep --help` by `python -m torchkeep.cli.reference > docs/CLI.md`; do not edit.",
            "",
            "```text",
            parser.format_help().rstrip(),
            "```",
        ]
        for name, sub in commands.choices.items():
            lines += ["", f"## torchkeep {name}", "", "```text", sub.format_help().rstrip(), "```"]
    return "\n".join(lines) + "\n\n" + JSON_SCHEMAS


if __name__ == "__main__":
    print(reference(), end="")
