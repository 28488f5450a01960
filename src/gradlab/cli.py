"""What every entry point shares: user errors become one paragraph and exit code 2."""

import importlib
import sys

from omegaconf import DictConfig

from gradlab.errors import EXIT_USER_ERROR, UserError


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def run_entry(module: str, cfg: DictConfig):
    """Import `module` (heavy: Lightning, torch) and call its `run(cfg)`, turning UserError into a clean exit."""
    try:
        return importlib.import_module(module).run(cfg)
    except UserError as err:
        fail(str(err))
