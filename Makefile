# DACT Lab — two commands on a fresh machine:
#   make run    start the dashboard on the bundled defaults (http://127.0.0.1:8501)
#   make test   run the test suite
# and, after changing what is installed:
#   make lock   write constraints.txt (the tested versions) from .venv
PY ?= python3
# where torch comes from when no local wheel is found: the CPU build (GPU users: a CUDA index of pytorch.org)
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
VENV ?= .venv
BIN := $(VENV)/bin
# the torch release of the lock, installed first and explicitly
TORCH_VERSION := $(shell sed -n 's/^torch==//p' constraints.txt)
TORCH_STAMP := $(VENV)/.torch-$(TORCH_VERSION)
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test

.PHONY: run test install lock bench clean-home lint

# torch first, explicitly: the local CPU wheel (offline, find-links; its dependencies come with the next step) or
# the TORCH_INDEX build; a no-op when .venv already has this torch (a GPU build a user installed stays)
$(TORCH_STAMP): constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-index --no-deps torch==$(TORCH_VERSION) || \
		$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION) --index-url $(TORCH_INDEX)
	touch $@

# the runtime set: the package (editable, the dact-lab command) + the app extra, at the versions of constraints.txt
$(RUN_STAMP): $(TORCH_STAMP) requirements.txt pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

# the dev set: the runtime set + the test, lint and "More than one machine" / report_to extras
$(TEST_STAMP): $(RUN_STAMP) requirements-dev.txt
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

install: $(TEST_STAMP)

run: $(RUN_STAMP)
	$(BIN)/python -m streamlit run app.py --server.address 127.0.0.1 --server.headless true

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q

# ruff (clean), complexity with reasons, mypy no worse than .ci/mypy_baseline.json (tools/lint.py); .ci/run runs it
lint: $(TEST_STAMP)
	$(BIN)/python tools/lint.py

# the tested versions: what .venv holds of the runtime + dev set (tools/lock.py), torch without its local label
lock: $(TEST_STAMP)
	$(BIN)/python tools/lock.py > constraints.txt.new
	mv constraints.txt.new constraints.txt

bench: $(TEST_STAMP)
	$(BIN)/python bench/train_throughput.py
