# The front door: `make demo` and `make test` each set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DATA := data
SYNTH := $(DATA)/synthetic
PREPARED := $(DATA)/prepared
RUN := runs/demo

.PHONY: venv demo test lint bench clean-demo

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) prepare.py --synthetic $(SYNTH) --out $(PREPARED) --val-ids 20

test: $(STAMP)
	$(PY) -m pytest tests

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) bench/eval_speed.py

clean-demo:
	rm -rf $(RUN) $(PREPARED) $(SYNTH)
