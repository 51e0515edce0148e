"""The ``torchkeep`` command line: the top layer, nothing imports it."""
