"""tools/ on the import path: the tests load the data sets with tools/image_data.py and run the
tools' functions, importing them as top-level modules, as the tool scripts import each other."""

import sys
from pathlib import Path

TOOLS = str(Path(__file__).resolve().parents[1] / "tools")
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)


import pytest  # noqa: E402


@pytest.fixture
def general_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain eager sampled linears of every size take the general kernel (``ops.kernels``).

    Small ones otherwise take ``ops.small``, which has no workspace, live columns or custom ops;
    the tests of those use this fixture.
    """
    from approxcompile.ops import small

    monkeypatch.setattr(small, "SMALL_GRADIENT", 0)
