# Two commands on a fresh machine:  `make serve` (demo model on :8000)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# torch 2.13.0 from PyPI: the CUDA build on Linux GPU hosts; a CPU wheel where pip is pointed at one.
TORCH  ?= torch==2.13.0
# What the installed package is built from: a change to any of these reinstalls it.
SOURCES := pyproject.toml README.md $(shell find kvserve server cache scheduler bench -type f \
             \( -name '*.py' -o -name py.typed -o -name '*.html' \) -not -path '*/__pycache__/*')

.PHONY: setup serve test develop bench clean

# The venv with torch: the heavy part, installed once.
$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	@touch $@

# Serving only: kvserve and its runtime dependencies, installed (not editable) from this checkout.
$(VENV)/.installed-serve: $(VENV)/.torch $(SOURCES)
	@rm -f $(VENV)/.installed-develop
	$(BIN)/pip install -q .
	@touch $@

# The test suite runs against the installed (not editable) package, with the test and bench extras.
$(VENV)/.installed-test: $(VENV)/.torch $(SOURCES)
	@rm -f $(VENV)/.installed-develop
	$(BIN)/pip install -q ".[test]"
	@touch $@

setup: $(VENV)/.installed-serve

serve: $(VENV)/.installed-serve
	$(BIN)/kvserve serve $(ARGS)

# The venv's pytest binary, not `python -m pytest`: that would put the repository root on sys.path,
# where the bare kvserve/ folder would shadow the installed package.
test: $(VENV)/.installed-test
	PATH="$(abspath $(BIN)):$$PATH" bash .ci/prometheus.sh
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pytest -q $(ARGS)

# For contributors: an editable install with every extra (source edits take effect without reinstalling).
develop: $(VENV)/.torch
	@rm -f $(VENV)/.installed-serve $(VENV)/.installed-test $(VENV)/.installed-bench
	$(BIN)/pip install -q -e ".[test]"
	@touch $(VENV)/.installed-develop

$(VENV)/.installed-bench: $(VENV)/.torch $(SOURCES)
	@rm -f $(VENV)/.installed-develop
	$(BIN)/pip install -q ".[bench]"
	@touch $@

bench: $(VENV)/.installed-bench
	$(BIN)/kvserve bench $(ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info
