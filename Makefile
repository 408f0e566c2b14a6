# `make demo` and `make test` set everything up themselves (a .venv in the repo).
VENV ?= .venv
PY := $(VENV)/bin/python
SEGAPP := $(VENV)/bin/segapp
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: setup demo examples serve browser test lint bench

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,ray]"
	touch $(STAMP)

setup: $(STAMP)

# The main job on the bundled tiny model: the web UI on http://127.0.0.1:7860 (Ctrl-C stops it).
demo: setup
	$(SEGAPP) demo

# Segment every example in data/examples into out/ from the command line.
examples: setup
	@for json in data/examples/*.json; do \
	  img=$$(ls $${json%.json}.png $${json%.json}.jpg 2>/dev/null | head -n 1); \
	  text=$$($(PY) -c 'import json,sys; print(json.load(open(sys.argv[1]))["text"][0])' "$$json"); \
	  echo "== $$img: $$text"; \
	  $(SEGAPP) segment "$$img" "$$text" --out-dir out || exit 1; \
	done
	@echo "masks and overlays are in out/"

# The REST backend on http://127.0.0.1:8000 (the UI can use it: segapp demo --backend URL).
serve: setup
	$(SEGAPP) serve

# Debian's chromium for the browser tests (they skip, saying why, when it is missing).
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	    --no-install-recommends chromium fonts-dejavu-core) >/dev/null \
	  || echo "warning: could not install chromium: the browser tests will skip"; \
	else echo "note: no apt-get (or not root): the browser tests will skip"; fi

lint: setup
	$(VENV)/bin/ruff check segapp tests ui
	$(VENV)/bin/ruff format --check segapp tests ui
	$(VENV)/bin/mypy segapp

test: lint browser
	$(VENV)/bin/pytest -q

bench: setup
	$(SEGAPP) bench image
	$(SEGAPP) bench image --sam vit_b
	$(SEGAPP) bench video
	$(SEGAPP) bench video --llm-hidden 1024 --llm-layers 8
	$(SEGAPP) bench serve
