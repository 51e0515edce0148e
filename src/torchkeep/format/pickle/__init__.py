"""Reading pickles without running their code: a reviewed allowlist, a restricted unpickler, a scanner."""
