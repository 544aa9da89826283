# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install what they need,
# torch first (CPU build by default; set TORCH="torch" or a CUDA wheel spec on a GPU machine).
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install demo test lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
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
