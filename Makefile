# Two commands on a fresh machine:  `make serve` (demo model on :8000)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# torch 2.13.0 from PyPI: the CUDA build on Linux GPU hosts; a CPU wheel where pip is pointed at one.
TORCH  ?= torch==2.13.0

.PHONY: setup serve test bench clean

$(BIN)/kvserve: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,bench]"
	@touch $@

setup: $(BIN)/kvserve

serve: setup
	$(BIN)/kvserve serve $(ARGS)

test: setup
	PATH="$(abspath $(BIN)):$$PATH" bash .ci/prometheus.sh
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q $(ARGS)

bench: setup
	$(BIN)/kvserve bench $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
