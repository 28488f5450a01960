"""Test-only: on PYTHONPATH, freezes the run-folder timestamp to $GRADLAB_FROZEN_STAMP, so that runs started by a
test all ask for the same name, as runs started in the same second do."""

import os
import time

_strftime = time.strftime


def _frozen(fmt, *args):
    if fmt == "%Y-%m-%d_%H-%M-%S" and not args and os.environ.get("GRADLAB_FROZEN_STAMP"):
        return os.environ["GRADLAB_FROZEN_STAMP"]
    return _strftime(fmt, *args)


time.strftime = _frozen
