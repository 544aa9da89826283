# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install what they need,
# torch first. Where there is no NVIDIA GPU (no `nvidia-smi`) on Linux, torch comes from PyTorch's CPU wheel index:
# PyPI's Linux wheels are CUDA builds (gigabytes). With a GPU, or on macOS (PyPI's wheels there are CPU/MPS builds),
# from pip's usual index. Override any of these: `make test TORCH="torch==2.5.1" TORCH_INDEX= EXTRAS=dev`; a changed
# setting reinstalls into the existing .venv.
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
CPU_ONLY := $(if $(filter Linux,$(shell uname -s)),$(if $(shell command -v nvidia-smi 2>/dev/null),,yes),)
TORCH_INDEX ?= $(if $(CPU_ONLY),https://download.pytorch.org/whl/cpu,)
# The `quantization` extra (optimum-quanto, for the int8 test) needs torch >= 2.6: with an older TORCH, EXTRAS=dev.
EXTRAS ?= dev,quantization
BIN := $(VENV)/bin
SETTINGS := TORCH=$(TORCH) TORCH_INDEX=$(TORCH_INDEX) EXTRAS=$(EXTRAS)

.PHONY: install demo test lint mutation clean FORCE

# Rewritten only when the settings change, so that a new TORCH/TORCH_INDEX/EXTRAS reinstalls.
$(VENV)/.settings: FORCE
	@mkdir -p $(VENV)
	@echo '$(SETTINGS)' | cmp -s - $@ || echo '$(SETTINGS)' > $@

# `--index-url` replaces pip's default index for torch alone (its dependencies resolve there too; the CPU index
# carries them); a pip configuration's find-links or extra indexes still apply.
$(BIN)/.installed: pyproject.toml $(VENV)/.settings
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --retries 2 --timeout 30 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),) "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/lssgen demo

# One worker per core (pytest-xdist; each computes on one thread, tests/conftest.py), a test file per worker so that
# each module's tiny models are built once.
test: install
	$(BIN)/python -m pytest -q -n auto --dist loadfile

lint: install
	$(BIN)/ruff check lssgen tests weights scripts && $(BIN)/ruff format --check lssgen tests weights scripts

# Mutation testing of the runtime core (docs/testing.md): the core files whole, the adapters' packing and
# normalisation methods, each mutant against the fast tests in [tool.mutmut] that run its function.
MUTANTS := "lssgen.plan.*" "lssgen.schedule.*" "lssgen.scaling.*" "lssgen.controller.*" "lssgen.latents.*" \
	"lssgen.upsampler.*" $(foreach method,pack unpack latents_to_vae vae_to_latents _bn_stats latent_normalization,\
	"lssgen.adapters.*ǁ$(method)__mutmut_*")
mutation: install
	$(BIN)/mutmut run $(MUTANTS) > mutants.log 2>&1 || (tail -20 mutants.log; false)
	$(BIN)/python scripts/mutation_table.py

clean:
	rm -rf $(VENV) outputs .pytest_cache mutants mutants.log
