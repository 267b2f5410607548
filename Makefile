# hpc-seg: the two commands of the README.
#   make demo   set up .venv (CPU torch first) and run the embedded end-to-end default
#   make test   set up .venv, start the local SLURM cluster (slurm/local_cluster.sh), run the tests that
#               need nothing beside the checkout (a fresh clone passes it)
#   make test-shared   the second suite: tests on LiTS / Kvasir-SEG / CHAOS from ../shared/data
#               (not redistributable here; fails, naming the data's origin, when absent). CI runs both.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: setup demo test test-shared bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -c constraints.txt -e ".[test,peers]"
	touch $@

demo: setup
	$(VENV)/bin/hpc-seg demo

test: setup
	bash slurm/local_cluster.sh start
	$(PY) -m pytest -q -m "not shared_data" tests

test-shared: setup
	$(PY) -m pytest -q -m shared_data tests

bench: setup
	$(PY) bench/data_loading.py
	$(PY) bench/model_stats.py
	$(PY) bench/engine.py
	$(PY) bench/plan_scaling.py

clean:
	rm -rf outputs .pytest_cache
