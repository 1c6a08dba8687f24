# Set-up and common tasks. Everything installs into .venv.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv data demo test lint reproduce benchmark clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'

venv: $(PY)

# Fashion-MNIST from Debian's package when possible (needs root); otherwise the CLI downloads it.
data:
	@test -d /usr/share/datasets/fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
		|| echo "dataset-fashion-mnist not installed: the CLI will download Fashion-MNIST into ./datasets"

# A real experiment: Split Fashion-MNIST, DER++ (buffer 500): well under a minute on a laptop CPU.
demo: $(PY) data
	$(PY) cli.py --dataset fashion-mnist --training_type continual --synapse_type der++ --buffer_size 500 --output_dir runs/demo

test: $(PY) data
	$(VENV)/bin/python -m pytest -q

lint: $(PY)
	$(VENV)/bin/ruff check src tests benchmarks examples cli.py
	$(VENV)/bin/mypy

reproduce: $(PY)
	$(PY) benchmarks/reproduce.py

benchmark: $(PY)
	$(PY) benchmarks/step_overhead.py

clean:
	rm -rf $(VENV) runs
