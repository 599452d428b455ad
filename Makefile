# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-all clean-results

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	touch $@

# A short DMS run on the CPU (ES-D-RTRL, 100 ms delay); results in results/dms/cpu-demo/.
demo: $(VENV)/.installed
	$(PY) task-rsnn-long-term-dependency.py --preset cpu-demo

# The CI suite (CPU, tiny networks); `make test-all` adds any test marked slow (none at present).
test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" tests

test-all: $(VENV)/.installed
	$(PY) -m pytest -q tests

clean-results:
	rm -rf results

# One table of every run under RESULTS (default results/): RESULTS/results.md and RESULTS/results.csv.
RESULTS ?= results
.PHONY: results-table
results-table: $(VENV)/.installed
	$(PY) scripts/results_table.py $(RESULTS)
