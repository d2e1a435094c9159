# Two entry points, both self-installing on a fresh machine:
#   make demo   set up .venv and run the main job on its embedded defaults
#   make test   set up .venv and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test
setup: $(VENV)/.installed

# torch is pinned here, not in the package metadata: with no torch present, an unpinned
# requirement makes pip fetch a multi-GB CUDA build; 2.13.0 is the CPU wheel on local disk.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/droprnn demo

test: setup
	$(PY) -m pytest
