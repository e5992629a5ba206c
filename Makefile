# Two entry points for a fresh machine:
#   make demo  - install into .venv, synthesise the embedded data, run the demo chain (shipped
#                teacher -> baseline and LD students, three seeds each)
#   make test  - install into .venv (with test extras) and run the test suite
#   make mutation - mutation score of the core modules (installs the dev extra: mutmut)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pair that imports together on this project's machines (a CUDA build
# that also runs on the CPU); override e.g. TORCH_SPEC="torch torchvision" elsewhere.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO_DATA ?= data/synth
DEMO_DIR ?= work_dirs/demo

.PHONY: demo test install clean mutation

# the demo needs ldpipe and its dependencies only; the tests also the test extras (ONNX,
# TensorBoard, S3 through moto, ...: ~40 s more to install)
$(VENV)/.installed-base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed: $(VENV)/.installed-base
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

$(DEMO_DATA)/annotations/val.json: ldpipe/data/synth.py | $(VENV)/.installed-base
	$(VENV)/bin/ldpipe data synth $(DEMO_DATA)

demo: $(VENV)/.installed-base $(DEMO_DATA)/annotations/val.json
	$(VENV)/bin/ldpipe chain pipelines/demo.toml --work-dir $(DEMO_DIR) -o data.root=$(DEMO_DATA)

# two pytest workers (pytest-xdist), each test file on one of them: 400 tests in 6.7 min
# instead of 10.4 in one process on the 2-core development VM (2026-12-03)
TEST_WORKERS ?= 2

test: $(VENV)/.installed
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

mutation: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev]'
	nice $(PY) tools/mutation.py $(MODULES)

clean:
	rm -rf $(DEMO_DIR) $(DEMO_DATA)
