# One obvious way to run each thing. Every target first makes sure the virtualenv exists.
VENV ?= .venv
BIN := $(VENV)/bin
# Stage commands in dvc.yaml call `python` and `dvc`: put the virtualenv first on PATH.
export PATH := $(abspath $(BIN)):$(PATH)
# A sweep directory (and so a sweep id) is used once: stamp it.
SWEEP_STAMP := $(shell date +%Y%m%d-%H%M%S)

.PHONY: setup reproduce exp-show sweep findings test test-slow test-ui test-ray test-slurm benchmark ui lock

# Exact versions, from lock files: requirements/setup.txt is what the pipeline needs
# (pyproject.toml's dependencies); test.txt adds the `test` extra (pytest and the server,
# launcher and Optuna extras its tests use); ui.txt adds playwright for test-ui. Each lock is
# resolved with the one before as a constraint, so a package has one version in all three.
# pyproject.toml keeps the ranges, for installing birnn as a library.
setup: $(VENV)/.installed .dvc/plots/offline.html

# `dvc plots show`'s page with Vega's code inline (.dvc/config names it): it renders offline.
.dvc/plots/offline.html: scripts/offline_plots.py
	python3 scripts/offline_plots.py

$(VENV)/.installed: requirements/setup.txt pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements/setup.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements/test.txt
	$(BIN)/python -m pip install --quiet -r requirements/test.txt
	touch $@

$(VENV)/.installed-ui: $(VENV)/.installed-test requirements/ui.txt
	$(BIN)/python -m pip install --quiet -r requirements/ui.txt
	touch $@

# Refresh the locks after editing pyproject.toml's dependencies (or to take newer releases):
# `pip install uv` (any Python), then `make lock`; uv keeps a package's locked version unless
# the ranges exclude it, `make lock UPGRADE=--upgrade` moves everything to the newest allowed.
# Then `make test`, and commit pyproject.toml with requirements/.
UV ?= uv
lock:                     ## re-resolve requirements/*.txt from pyproject.toml (needs uv)
	$(UV) pip compile --quiet --universal $(UPGRADE) pyproject.toml -o requirements/setup.txt
	$(UV) pip compile --quiet --universal $(UPGRADE) pyproject.toml --extra test \
	    --constraint requirements/setup.txt -o requirements/test.txt
	$(UV) pip compile --quiet --universal $(UPGRADE) pyproject.toml --extra test --extra ui \
	    --constraint requirements/test.txt -o requirements/ui.txt

# Fashion-MNIST comes from Debian's dataset-fashion-mnist (conf/data/fashion_mnist.yaml's
# raw_dir); without it, reproduce makes MNIST's table alone and says how to add the other.
FASHION_MNIST := $(wildcard /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz)

reproduce: setup          ## the book experiment: prepare, train uni and bi, evaluate, report
ifeq ($(FASHION_MNIST),)
	dvc repro compare@mnist
	@echo "Table 19-12 for MNIST is in reports/table_19_12/mnist/report.md. Fashion-MNIST was skipped (not installed); to add it: sudo apt-get install dataset-fashion-mnist && make reproduce"
else
	dvc repro
endif

exp-show: setup           ## dvc exp show in 120 columns: each experiment's state, preset, epochs, changed settings, test accuracy
	python -m pipeline.commands.exp_show $(ARGS)

sweep: setup              ## the book configuration over 5 seeds, one job per core (~8 min on 2), then its report
	python -m pipeline.stages.train -m hydra/launcher=joblib model=uni,bi train.seed=0,1,2,3,4 \
	    hydra.sweep.dir=multirun/book-seeds-$(SWEEP_STAMP)
	python -m pipeline.commands.sweep_report sweep=book-seeds-$(SWEEP_STAMP)

findings: setup           ## reports/findings.md from the sweeps named in study/conf/findings.yaml
	python -m study.findings

test: $(VENV)/.installed-test .dvc/plots/offline.html   ## the fast test suite (a few minutes on 2 cores)
	python -m pytest

test-slow: $(VENV)/.installed-test   ## the long checks: the full book configuration end to end
	python -m pytest -m slow

test-ui: $(VENV)/.installed-ui .dvc/plots/offline.html   ## the MLflow UI in headless Chromium (apt-get install chromium), a few minutes
	python -m pytest -m ui

test-ray:                 ## the Ray launcher tests (needs postgresql), in their own virtualenv (.venv-ray, about 1.3 GB)
	python3 -m venv .venv-ray
	.venv-ray/bin/python -m pip install --quiet -e ".[test]" hydra-ray-launcher
	.venv-ray/bin/python -m pytest -m ray

test-slurm: $(VENV)/.installed-test   ## sweeps on a throwaway one-node Slurm, about 4 min (root; apt-get install slurmctld slurmd munge postgresql)
	python -m pytest -m slurm

benchmark: setup          ## seconds per epoch and peak memory, as JSON
	python benchmarks/epoch.py

ui: setup                 ## the MLflow UI on http://127.0.0.1:5000, opened on the experiment's runs
	@python -c "from mlflow import MlflowClient; from pipeline.stages import compare; \
	    from pipeline.tracking import store; print('open', compare.runs_page_url( \
	    MlflowClient(store.default_uri()), 'birnn-table-19-12'))"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri sqlite:///$(abspath mlflow.db) --host 127.0.0.1 --port 5000
