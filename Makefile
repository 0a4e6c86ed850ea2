# Two commands: `make run` (set up, then run the main job) and `make test` (set up, then test).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On a machine without an NVIDIA GPU, pin the CPU build of torch (never pull CUDA wheels).
TORCH_PIN := $(if $(shell command -v nvidia-smi 2>/dev/null),,-c constraints-cpu.txt)

.PHONY: setup run test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN) -e '.[test]'
	touch $@

run: setup
	$(VENV)/bin/rlhfzoo bench --quick --out runs/bench-quick

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .cache
