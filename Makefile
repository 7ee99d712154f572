# distillery: `make serve` and `make test` set everything up from a fresh clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
BENCH ?=
QUICK ?=

.PHONY: install serve test bench train-oracle train-toy clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The pinned CPU build first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(BIN)/distillery serve --host $(HOST) --port $(PORT)

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python -m bench $(BENCH) $(if $(QUICK),--quick,)

# Reproduce the committed artefacts (see README: "Reproducing the toy model").
train-oracle: install
	$(BIN)/distillery train-oracle

train-toy: install
	$(BIN)/distillery train-toy

clean:
	rm -rf $(VENV) .work .bench
