"""``python -m torchkeep``: the ``torchkeep`` command."""

from torchkeep.cli.main import main

raise SystemExit(main())
