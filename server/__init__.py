"""The user-facing front: the `tokenmill` command line (cli.py). The OpenAI-compatible HTTP server comes here."""
