"""Silence native (C++) output around exporter and ORT calls that print what is not an error.

The TorchScript exporter prints the whole TorchScript IR to file descriptor 1 before raising on
an unsupported operator, and ORT's gradient builder logs every graph transformer at INFO level
to descriptor 2 regardless of ``onnxruntime.set_default_logger_severity``. Both failures still
surface as exceptions, which the callers turn into one-line errors.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Mute descriptors 1 and 2, Python's ``sys.stdout``/``sys.stderr`` and warnings for the block."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with (
            open(os.devnull, "w") as devnull,
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            os.dup2(devnull.fileno(), 1)
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
