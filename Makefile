# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch is installed first, so the project's torch range is already met and
# pip never pulls a multi-GB CUDA build on a CPU machine. GPU users install their own torch.
TORCH_SPEC ?= torch==2.13.0

.PHONY: run test test-slow lint bench bench-llc-env gpu-check docs install clean

$(BIN)/devinterp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/devinterp

# prints its own wall time, set-up included (the README's figure is this line on a fresh clone)
run:
	@start=$$(date +%s); $(MAKE) --no-print-directory install && \
	WANDB_MODE=offline $(BIN)/devinterp fit --config configs/quickstart.yaml; code=$$?; \
	echo "make run: $$(( $$(date +%s) - start )) s of wall time, set-up included"; exit $$code

# one pytest-xdist worker per core (tests/conftest.py), a test file's tests on one worker, so a
# module's fixtures are built once
PYTEST := WANDB_MODE=offline $(BIN)/python -m pytest -q -n auto --dist loadfile

test: install
	$(PYTEST)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# the documentation site from docs/ into site/ (offline; --strict: a broken link or a missing page fails)
docs: install
	$(BIN)/pip install -q -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

test-slow: install
	$(PYTEST) -m slow

bench: install
	$(BIN)/python bench/run_all.py

# The prepared device check: run as it is on a GPU machine (its own python3, no venv, no
# network); on a CPU it says it needs CUDA and exits 0.
gpu-check:
	$(PYTHON) bench/gpu_check.py

# The reference LLC library (timaeus devinterp 2.0.1) for bench/llc_speed.py, in a virtual
# environment of its own: it imports as `devinterp`, which is our package's name too.
bench-llc-env: .venv-devinterp/bin/python

.venv-devinterp/bin/python:
	$(PYTHON) -m venv .venv-devinterp
	.venv-devinterp/bin/pip install -q "$(TORCH_SPEC)"
	.venv-devinterp/bin/pip install -q -r bench/requirements-devinterp.txt

clean:
	rm -rf $(VENV) .venv-devinterp runs site
