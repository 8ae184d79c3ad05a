# Every target creates .venv on first use. pip takes torch 2.14.1 / torchvision 0.29.1 from local disk.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: test demo venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

test: venv
	$(PY) -m pytest -q

# The main job on the embedded default, offline: see scripts/prune_yolo.sh (run folder runs/demo).
demo: venv
	PYTHON=$(PY) scripts/prune_yolo.sh

clean:
	rm -rf $(VENV) build *.egg-info
