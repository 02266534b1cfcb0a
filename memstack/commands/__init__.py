"""Subcommands of `memstack` that have their own module (cli.py adds their parsers): they sit at
the top layer, so they may use the trainer, the harness and the engine (DESIGN.md, "Layers")."""
