"""Keeping other libraries' output off stdout, which carries a command's results only.

Some libraries print to stdout: ModelOpt's progress ("Inserted 261 quantizers"), and the
TorchScript exporter's graph dumps from C++ when it fails. ``stdout_to_log`` sends both kinds
(Python's sys.stdout and file descriptor 1) to the log instead.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def stdout_to_log(logger: logging.Logger, level: int = logging.DEBUG) -> Iterator[None]:
    """Everything written to stdout inside the block goes to ``logger`` at ``level``."""
    sys.stdout.flush()
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):  # stdout replaced by a non-file
        fd = None
    python_text = io.StringIO()
    with tempfile.TemporaryFile(mode="w+b") as sink, contextlib.redirect_stdout(python_text):
        saved = None
        if fd is not None:
            saved = os.dup(fd)
            os.dup2(sink.fileno(), fd)
        try:
            yield
        finally:
            if saved is not None:
                os.dup2(saved, fd)
                os.close(saved)
            sink.seek(0)
            captured = sink.read().decode(errors="replace") + python_text.getvalue()
            for line in captured.splitlines():
                if line.strip():
                    logger.log(level, "%s", line)
