"""tools/ on the import path: the tests load the data sets with tools/image_data.py and run the
tools' functions, importing them as top-level modules, as the tool scripts import each other."""

import sys
from pathlib import Path

TOOLS = str(Path(__file__).resolve().parents[1] / "tools")
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)
