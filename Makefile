# The README's two commands: `make run` and `make test`. Both create .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export RAY_AUTH_MODE := disabled
export PYTHONUNBUFFERED := 1

.PHONY: run test venv clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU build on this machine's disk, or the CUDA build on a GPU box.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

run: venv
	$(BIN)/python -m serve.run --exit-with-parent deploy.yaml

test: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
