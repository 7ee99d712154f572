# distillery: `make serve` and `make test` set everything up from a fresh clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
BENCH ?=
QUICK ?=

.PHONY: install tools serve test bench train-oracle train-toy clean

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

# promtool and the Prometheus server (Debian's package) for the deployment tests.
tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq prometheus >/dev/null)

test: install tools
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
