"""Entry points: ``python -m jobs.<name>``. Each parses flags, resolves the config,
starts or connects to Ray and calls into :mod:`pipeline`."""
