"""``python -m approxcompile``: the same as the ``approxcompile`` command."""

from __future__ import annotations

from approxcompile.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
