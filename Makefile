# DACT Lab — two commands on a fresh machine:
#   make run    start the dashboard on the bundled defaults (http://127.0.0.1:8501)
#   make test   run the test suite
PY ?= python3
# where torch comes from when no local wheel is found: the CPU build (GPU users: a CUDA index of pytorch.org)
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test install bench clean-home

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, explicitly: the local CPU wheel (offline, find-links; its dependencies come with the next line)
	# or the TORCH_INDEX build; a no-op when
	# .venv already has torch 2.13.0 (a GPU build a user installed stays)
	$(BIN)/python -m pip install --quiet --no-index --no-deps torch==2.13.0 || \
		$(BIN)/python -m pip install --quiet torch==2.13.0 --index-url $(TORCH_INDEX)
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .   # the dact_lib package + the dact-lab command
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m streamlit run app.py --server.address 127.0.0.1 --server.headless true

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/train_throughput.py
