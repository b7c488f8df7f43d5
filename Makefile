# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision are pinned to the releases available on this machine's disk.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test lint

$(BIN)/kdistill: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e ".[dev]"
	touch $(BIN)/kdistill

install: $(BIN)/kdistill

demo: install
	$(BIN)/kdistill demo $(ARGS)

test: install
	$(BIN)/ruff check .
	# one intra-op thread: in-process and subprocess runs then reduce in the same order (seeded resume tests compare bit for bit)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
