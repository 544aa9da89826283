# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install what they need,
# torch first (CPU build by default; set TORCH="torch" or a CUDA wheel spec on a GPU machine).
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
# The `quantization` extra (optimum-quanto, for the int8 test) needs torch >= 2.6: with an older TORCH, EXTRAS=dev.
EXTRAS ?= dev,quantization
BIN := $(VENV)/bin

.PHONY: install demo test lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/lssgen demo

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check lssgen tests weights && $(BIN)/ruff format --check lssgen tests weights

clean:
	rm -rf $(VENV) outputs .pytest_cache
