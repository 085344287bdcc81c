# tumorseg: two commands do all set-up on a fresh machine with Python 3.11 and make.
#   make run   - create .venv, install, initialise DVC, run the pipeline on the quick profile
#   make test  - create/update .venv the same way and run the test suite
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed-stamp

# Offline-friendly: no update checks or telemetry from the tools we drive.
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export NO_ALBUMENTATIONS_UPDATE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export TF_CPP_MIN_LOG_LEVEL := 2
# `dvc exp run` records experiments as git commits and needs an identity; supply one only if unset.
export GIT_AUTHOR_NAME ?= $(or $(shell git config user.name 2>/dev/null),tumorseg)
export GIT_AUTHOR_EMAIL ?= $(or $(shell git config user.email 2>/dev/null),tumorseg@localhost)
export GIT_COMMITTER_NAME ?= $(GIT_AUTHOR_NAME)
export GIT_COMMITTER_EMAIL ?= $(GIT_AUTHOR_EMAIL)

PROFILE ?= quick

.PHONY: install run repro show test test-fast lint dag clean help server server-stop server-status

help:
	@echo "make run    - set up and run the whole pipeline on the '$(PROFILE)' profile (PROFILE=full for the reference settings)"
	@echo "make test   - set up and run the tests"
	@echo "make test-fast - the edit-test loop: the tests not marked slow (no training, no TFLite/ONNX conversion, no pipeline runs)"
	@echo "make lint   - ruff (pyflakes, pycodestyle with 160-column lines, isort, bugbear, pyupgrade) and the import-linter layer contracts"
	@echo "make show   - the DVC experiments as one table: changed params, each model's test Dice/IoU/HD95, data source"
	@echo "make dag    - show the DVC pipeline graph"
	@echo "make server - start a team MLflow tracking server on PostgreSQL in .mlflow-server/ and print the MLFLOW_TRACKING_URI to export"
	@echo "make server-stop - stop it (every process it started); make server-status - running or not, URI and ports"

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

.dvc/config: | $(STAMP)
	dvc init --quiet
	dvc config core.analytics false

# The quick profile is applied as a DVC experiment parameter, so `dvc exp show` records it.
run: $(STAMP) .dvc/config
	dvc exp run --set-param profile=$(PROFILE)
	@$(VENV)/bin/tumorseg results
	@echo "done (profile=$(PROFILE)): metrics in metrics/ (dvc metrics show), report in reports/comparison.md, data in data/;"
	@echo "      runs and models: .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db, then http://127.0.0.1:5000"

# The experiments as one readable table (dvc exp show has every param and metric as a column).
show: $(STAMP) .dvc/config
	@$(VENV)/bin/tumorseg results

# Plain `dvc repro` with params.yaml exactly as it is.
repro: $(STAMP) .dvc/config
	dvc repro

dag: $(STAMP) .dvc/config
	dvc dag

# A team MLflow tracking server: PostgreSQL (Debian's `postgresql` package) and `mlflow server` with
# served artifacts, state in .mlflow-server/ (README, "Scaling out"). SERVER_ARGS goes on to
# `tumorseg server start` (--host, --port, --workers). Stopping needs no up-to-date install.
server: $(STAMP)
	@$(VENV)/bin/tumorseg server start $(SERVER_ARGS)

server-stop: | $(STAMP)
	@$(VENV)/bin/tumorseg server stop

server-status: | $(STAMP)
	@$(VENV)/bin/tumorseg server status

# pytest-xdist: one worker per core this process may use, at most 4 (each worker holds TensorFlow
# and some tests start trainings and servers of their own); TEST_WORKERS=0 runs one process (to
# debug with -s or pdb). Each test module runs whole in one worker (its module fixtures are built
# once); tests/conftest.py gives each worker one TensorFlow thread, so the workers share the cores
# instead of fighting over them.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n < 4 ? n : 4 )))
XDIST := -n $(TEST_WORKERS) --dist loadfile

# pytest exits 5 when it collects no tests: for this suite that is a failure, said plainly.
test: $(STAMP)
	@$(VENV)/bin/python -m pytest $(XDIST) $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The edit-test loop: every test not marked `slow` (no model training, no TFLite/ONNX conversion, no
# pipeline runs or heavy subprocesses). `make test` is the whole suite, as CI runs it.
test-fast: $(STAMP)
	@echo "make test-fast: pytest -m 'not slow' (no training, no conversion); 'make test' runs everything, as CI does"
	@$(VENV)/bin/python -m pytest $(XDIST) -m "not slow" $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test-fast: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The linters CI runs before the tests: ruff (rules and line length in pyproject.toml's [tool.ruff])
# over every Python folder, then import-linter's layer contracts ([tool.importlinter]).
lint: $(STAMP)
	$(VENV)/bin/ruff check src stages scripts benchmarks tests
	$(VENV)/bin/lint-imports

clean:
	rm -rf data/raw data/prepared data/augmented reports .pytest_cache
