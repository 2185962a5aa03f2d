# Two entry points on a fresh machine: `make demo` and `make test`. Each creates .venv and installs
# what it needs by itself. torch is pinned to the local CPU build (an unpinned torch pulls CUDA wheels).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   := torch==2.13.0
CKPT    := recipes/checkpoints/digits.pt

.PHONY: demo test venv bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH) -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

$(CKPT): examples/digits.py | $(STAMP)
	$(BIN)/python -m examples.digits --out $(CKPT)

demo: $(STAMP) $(CKPT)
	$(BIN)/effopt inspect recipes/digits.yaml
	$(BIN)/effopt compile recipes/digits.yaml -o out/digits
	$(BIN)/effopt compile recipes/digits_int8.yaml -o out/digits_int8
	$(BIN)/effopt evaluate recipes/digits_int8.yaml --artifact out/digits_int8
	$(BIN)/effopt compile recipes/digits_mcu.yaml -o out/digits_mcu

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf out $(CKPT)
