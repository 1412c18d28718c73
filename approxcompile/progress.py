"""What ``optimize`` is doing while it runs: the ``approxcompile`` logger and a progress bar.

Every pass logs its name, duration and statistics at INFO on ``logging.getLogger("approxcompile")``
(silent unless the application configures logging, as with any library logger):

>>> logging.basicConfig(level=logging.INFO)   # or logging.getLogger("approxcompile").setLevel(...)

The passes that run the model's products many times (sensitivity, timing) draw a one-line
progress bar on stderr while ``optimize(..., progress=...)`` allows it: ``None`` (the default)
draws only when stderr is a terminal and the pass has run for more than half a second, so tests,
CI logs and small models see nothing; ``True`` always draws, ``False`` never.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO, TypeVar

logger = logging.getLogger("approxcompile")

_ENABLED: contextvars.ContextVar[bool | None] = contextvars.ContextVar("approxcompile_progress", default=None)
_DELAY_S = 0.5  # an auto bar appears only for a pass slower than this
_F = TypeVar("_F", bound=Callable[..., Any])


@contextlib.contextmanager
def enabled(flag: bool | None) -> Iterator[None]:
    """Within the block, bars follow ``flag`` (``None``: auto, only on a terminal)."""
    token = _ENABLED.set(flag)
    try:
        yield
    finally:
        _ENABLED.reset(token)


class Bar:
    """``[sensitivity] 12/40 nodes  3.1s`` redrawn in place on ``stream``; a no-op when off."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label, self.total, self.done = label, total, 0
        self.stream = stream if stream is not None else sys.stderr
        flag = _ENABLED.get()
        is_tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.on = total > 0 and (flag is True or (flag is None and is_tty))
        self.delay = 0.0 if flag is True else _DELAY_S
        self.start = time.perf_counter()
        self.drawn = False

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.on:
            return
        elapsed = time.perf_counter() - self.start
        if elapsed < self.delay and self.done < self.total:
            return
        width = 24
        filled = width * self.done // self.total
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(f"\r[{self.label}] {bar} {self.done}/{self.total} nodes {elapsed:5.1f}s")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def logged(name: str, fn: _F) -> _F:
    """``fn`` (a pass) logging ``name``, its duration and its ``PassResult.stats`` at INFO."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        logger.debug("%s: started", name)
        result = fn(*args, **kwargs)
        stats = getattr(result, "stats", None)
        detail = ", ".join(f"{k}={_short(v)}" for k, v in stats.items() if k != "captured") if stats else ""
        logger.info("%s: %.3fs%s", name, time.perf_counter() - start, f" ({detail})" if detail else "")
        return result

    return run  # type: ignore[return-value]


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
