# `make demo` and `make test` set everything up themselves (a .venv in the repo).
VENV ?= .venv
PY := $(VENV)/bin/python
SEGAPP := $(VENV)/bin/segapp
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: setup demo test lint bench

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,ray]"
	touch $(STAMP)

setup: $(STAMP)

# The main job on the bundled tiny model: segment every example in data/examples into out/.
demo: setup
	@for json in data/examples/*.json; do \
	  img=$$(ls $${json%.json}.png $${json%.json}.jpg 2>/dev/null | head -n 1); \
	  text=$$($(PY) -c 'import json,sys; print(json.load(open(sys.argv[1]))["text"][0])' "$$json"); \
	  echo "== $$img: $$text"; \
	  $(SEGAPP) segment "$$img" "$$text" --out-dir out || exit 1; \
	done
	@echo "masks and overlays are in out/"

lint: setup
	$(VENV)/bin/ruff check segapp tests
	$(VENV)/bin/ruff format --check segapp tests
	$(VENV)/bin/mypy segapp

test: lint
	$(VENV)/bin/pytest -q

bench: setup
	$(SEGAPP) bench image
	$(SEGAPP) bench image --sam vit_b
