# Two commands do everything on a fresh machine: `make demo` and `make test`; `make help` lists the rest.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: help demo reproduce-dms reproduce-stream reproduce-credit test test-all clean-results
.DEFAULT_GOAL := help

# `make` or `make help`: every target with the one line after its `##`.
help:  ## list the targets, one line each
	@awk 'BEGIN {FS = ":[^#]*## "} /^[a-zA-Z_-]+:[^=]*## / {printf "  %-22s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	touch $@

# The paper's DMS task (1000 ms delay) with ES-D-RTRL at batch 32 on the CPU; results in results/dms/cpu-demo/.
demo: $(VENV)/.installed  ## the paper's 1000 ms DMS task with ES-D-RTRL on the CPU (results/dms/cpu-demo/)
	$(PY) task-rsnn-long-term-dependency.py --preset cpu-demo

# BPTT, ES-D-RTRL (3 seeds) and D-RTRL (1 seed, capped) on that task, the A2 = 0 control and a delay
# sweep; table and figures in results/dms/reproduce/ (docs/dms.md, "Reproduction").
reproduce-dms: $(VENV)/.installed  ## BPTT, ES-D-RTRL, D-RTRL on the DMS task with its controls (results/dms/reproduce/)
	$(PY) scripts/reproduce_dms.py

# The DMS task as 32 endless streams: ES-D-RTRL (3 seeds), D-RTRL (capped) and truncated BPTT windows, and
# the memory of one update up to full BPTT over the stream; results/dms/stream/ (README, "Learning on a
# stream"; docs/stream.md). TINY=1: toy sizes (seconds).
reproduce-stream: $(VENV)/.installed  ## the DMS task as endless streams, online rules against TBPTT; TINY=1: toy sizes
	$(PY) scripts/reproduce_stream.py $(if $(TINY),--tiny --out results/dms/stream-tiny,)

# Issue #24: the credit task on a stream, a delay sweep, TBPTT(k1, k2), the credit horizon (results/dms/credit/)
reproduce-credit: $(VENV)/.installed  ## the credit task on a stream, a delay sweep, TBPTT(k1, k2); TINY=1: toy sizes
	$(PY) scripts/reproduce_credit.py $(if $(TINY),--tiny --out results/dms/credit-tiny,) $(if $(BUDGET),--budget_min $(BUDGET),)

# Every rule of rsnn/methods.py on the DMS trials (make demo's settings), the DMS stream and the N-MNIST/SHD
# stand-ins at 3 x 128: table.csv, table.md and a figure per task in results/compare-rules/ (docs/online-rules.md).
# JOBS runs side by side, one per CPU core (default 2: the 2-core machine this was sized for).
# TINY=1: toy sizes; REDUCED=1: the short-delay DMS preset and short image runs.
.PHONY: compare-rules
JOBS ?= 2
compare-rules: $(VENV)/.installed  ## every rule on every task, JOBS side by side (results/compare-rules/); TINY=1
	$(PY) scripts/compare_rules.py --jobs $(JOBS) $(if $(TINY),--tiny --out results/compare-rules-tiny,)$(if $(REDUCED),--reduced --out results/compare-rules-reduced,)

# The CI suite (CPU, tiny networks), in TEST_WORKERS processes (pytest-xdist; a test file stays in one process,
# so its module fixtures are built once); `make test-all` adds the tests marked slow (the accelerator check's script).
TEST_WORKERS ?= 2
test: $(VENV)/.installed  ## the CI suite (CPU, tiny networks) in TEST_WORKERS processes
	$(PY) -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

test-all: $(VENV)/.installed  ## the suite with the tests marked slow
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

clean-results:  ## delete results/
	rm -rf results

# One table of every run under RESULTS (default results/): RESULTS/results.md and RESULTS/results.csv.
RESULTS ?= results
.PHONY: results-table
results-table: $(VENV)/.installed  ## one table of every run under RESULTS (default results/)
	$(PY) scripts/results_table.py $(RESULTS)

# For a machine with a GPU/TPU, once, in at most 10 minutes on paper (docs/accelerator-check.md): the jax that
# is there (no install where jax imports), a handful of exactness tests, the paper-size memory sweep (T = 100,
# 250, 500, 1000, the methods interleaved, a cap per row) and the README's three DMS commands for a fixed number
# of batches; everything in results/accelerator-check-<timestamp>/. TINY=1: toy sizes on the CPU (CI).
# PY: the python to use (default .venv/bin/python where it exists, else python3).
.PHONY: accelerator-check
accelerator-check:  ## the one run for a GPU/TPU machine, at most 10 minutes; TINY=1: toy sizes on the CPU
	$(if $(TINY),TINY=1 ,)$(if $(OUT),OUT=$(OUT) ,)bash scripts/accelerator-check.sh

# Issue #25: our rules' gradients against braintrace 0.2.6's EProp, SnAp-1, UORO, D_RTRL and pp_prop on a tiny LIF
# network (docs/online-rules.md, "Cross-check against braintrace 0.2.6"). Not in CI: it builds a second
# environment, .venv-braintrace, from requirements-braintrace.txt with Python 3.11 (PYTHON311).
PYTHON311 ?= python3.11
BT_VENV ?= .venv-braintrace
BT_OUT ?= results/braintrace-crosscheck
$(BT_VENV)/.installed: requirements-braintrace.txt
	$(PYTHON311) -m venv $(BT_VENV)
	$(BT_VENV)/bin/python -m pip install -r requirements-braintrace.txt
	touch $@

.PHONY: braintrace-crosscheck
braintrace-crosscheck: $(VENV)/.installed $(BT_VENV)/.installed  ## our rules' gradients against braintrace 0.2.6 (second environment)
	mkdir -p $(BT_OUT)
	$(PY) scripts/braintrace_crosscheck.py --export $(BT_OUT)/export.npz
	$(BT_VENV)/bin/python scripts/braintrace_crosscheck.py --braintrace $(BT_OUT)/export.npz --out $(BT_OUT)

# Issue #34: every rule tuned on a validation split (Optuna, one study per task and rule), then final runs over
# seeds at matched budgets, paired statistics against BPTT: results/benchmark/ (docs/benchmark.md). Resumable: run
# it again after any stop. JOBS local workers, each pinned to a core; STORAGE: an Optuna RDB URL or a journal file
# that several machines share. TINY=1: toy sizes (CI; results/benchmark-tiny/). REDUCED=1: the DMS trials on the
# short-delay preset, 100 updates, 8 trials per study (one session; results/benchmark-reduced/).
.PHONY: benchmark
benchmark: $(VENV)/.installed  ## every rule tuned (Optuna), then final runs over seeds (results/benchmark/); TINY=1, REDUCED=1
	$(PY) scripts/benchmark.py --jobs $(JOBS) $(if $(TINY),--tiny,)$(if $(REDUCED),--reduced,)$(if $(STORAGE), --storage $(STORAGE),)
