# Two commands do all the set-up on a fresh machine with python3 and make:
#   make demo   runs the movies job on the local Batch API server and writes Parquet
#   make test   runs the whole test suite
# Both create .venv and install the project into it first.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Prefect's temporary server keeps its database under PREFECT_HOME: one per checkout, so
# that no other Prefect version's database on the machine gets in the way.
export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120

.PHONY: install demo test lint bench third-party automations clean

# bench/e2e_scale.py's table sizes; `make bench SCALE_ROWS=1000000,10000000` for 10M rows
SCALE_ROWS ?= 100000,1000000

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/.installed

# always the local server: an OPENAI_API_KEY in the shell must not make the demo bill
demo: install
	$(BIN)/enrichflow run configs/movies.yaml --provider local

test: install
	$(BIN)/ruff check .
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python bench/localbatch_throughput.py
	$(BIN)/python bench/render_throughput.py
	$(BIN)/python bench/collect_throughput.py
	$(BIN)/python bench/e2e_scale.py --rows $(SCALE_ROWS)
	$(BIN)/python bench/memory_phases.py --rows 100000
	$(BIN)/python bench/runner_scale.py
	$(BIN)/python bench/python_api.py
	$(BIN)/python bench/startup.py
	$(BIN)/python bench/shared_budget.py

# the automations of automations.yaml, on the Prefect server PREFECT_API_URL points at
automations: install
	$(BIN)/prefect automation create --from-file automations.yaml

third-party: install
	tests/third_party/run.sh

clean:
	rm -rf $(VENV) .localbatch .prefect .third-party out
