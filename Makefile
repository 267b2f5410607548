# hpc-seg: the two commands of the README.
#   make demo   set up .venv (CPU torch first) and run the embedded end-to-end default
#   make test   set up .venv, start the local SLURM cluster (slurm/local_cluster.sh), run all tests
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/hpc-seg demo

test: setup
	bash slurm/local_cluster.sh start
	$(PY) -m pytest -q tests

bench: setup
	$(PY) bench/data_loading.py
	$(PY) bench/model_stats.py
	$(PY) bench/engine.py
	$(PY) bench/plan_scaling.py

clean:
	rm -rf outputs .pytest_cache
