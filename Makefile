# One obvious way to run each thing. Every target first makes sure the virtualenv exists.
VENV ?= .venv
BIN := $(VENV)/bin
# Stage commands in dvc.yaml call `python` and `dvc`: put the virtualenv first on PATH.
export PATH := $(abspath $(BIN)):$(PATH)
# A sweep directory (and so a sweep id) is used once: stamp it.
SWEEP_STAMP := $(shell date +%Y%m%d-%H%M%S)

.PHONY: setup reproduce sweep findings test test-slow test-ui test-ray benchmark ui

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

reproduce: setup          ## the book experiment: prepare, train uni and bi, evaluate, report
	dvc repro

sweep: setup              ## the book configuration over 5 seeds, one job per core (~8 min on 2), then its report
	python -m pipeline.stages.train -m hydra/launcher=joblib model=uni,bi train.seed=0,1,2,3,4 \
	    hydra.sweep.dir=multirun/book-seeds-$(SWEEP_STAMP)
	python -m pipeline.commands.sweep_report sweep=book-seeds-$(SWEEP_STAMP)

findings: setup           ## reports/findings.md from the sweeps named in study/conf/findings.yaml
	python -m study.findings

test: setup               ## the fast test suite (a few minutes on 2 cores)
	python -m pytest

test-slow: setup          ## the long checks: the full book configuration end to end
	python -m pytest -m slow

test-ui: setup            ## the MLflow UI in headless Chromium (apt-get install chromium), a few minutes
	python -m pytest -m ui

test-ray:                 ## the Ray launcher test, in its own virtualenv (.venv-ray, about 1.3 GB)
	python3 -m venv .venv-ray
	.venv-ray/bin/python -m pip install --quiet -e ".[dev]" hydra-ray-launcher
	.venv-ray/bin/python -m pytest -m ray

benchmark: setup          ## seconds per epoch and peak memory, as JSON
	python benchmarks/epoch.py

ui: setup                 ## the MLflow UI on http://127.0.0.1:5000, opened on the experiment's runs
	@python -c "from mlflow import MlflowClient; from pipeline.stages import compare; \
	    from pipeline.tracking import store; print('open', compare.runs_page_url( \
	    MlflowClient(store.default_uri()), 'birnn-table-19-12'))"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri sqlite:///$(abspath mlflow.db) --host 127.0.0.1 --port 5000
