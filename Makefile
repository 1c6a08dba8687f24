# Set-up and common tasks. Everything installs into .venv.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv data demo test lint reproduce benchmark clean

# The demo needs only the experiment program (the `cli` extra); the test tools come with `make test`.
$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cli]'

TEST_TOOLS := $(VENV)/.test-extra
$(TEST_TOOLS): $(PY)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(PY)

# Fashion-MNIST from Debian's package when possible (needs root); otherwise the CLI downloads it.
data:
	@test -d /usr/share/datasets/fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
		|| echo "dataset-fashion-mnist not installed: the CLI will download Fashion-MNIST into ./datasets"

# A real experiment: Split Fashion-MNIST, DER++ (buffer 500): well under a minute on a laptop CPU.
demo: $(PY) data
	$(PY) cli.py --dataset fashion-mnist --training_type continual --synapse_type der++ --buffer_size 500 --output_dir runs/demo

test: $(TEST_TOOLS) data
	$(VENV)/bin/python -m pytest -q

lint: $(TEST_TOOLS)
	$(VENV)/bin/ruff check src tests benchmarks examples cli.py
	$(VENV)/bin/mypy

reproduce: $(PY)
	$(PY) benchmarks/reproduce.py

benchmark: $(PY)
	$(PY) benchmarks/step_overhead.py

clean:
	rm -rf $(VENV) runs
