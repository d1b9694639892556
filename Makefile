# Two commands for users: `make demo` and `make test`. Both create or reuse .venv/ and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build that this project's machines carry; a GPU user installs their own torch first (see README).
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= data/demo_brain
RUNS_DIR ?= runs/demo
SEED ?= 0

.PHONY: install demo test lint format clean

$(VENV)/.installed: setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install --disable-pip-version-check -q -e ".[all]"
	@touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m monai_ssl.data.demo --out $(DEMO_DIR) --seed $(SEED)

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info
