# usdet: the two commands are `make demo` and `make test`; both set up .venv/ first if needed.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.usdet-setup-stamp
# Set USDET_SYSTEM_SITE=1 to build the venv on top of an environment that already has
# torch and detectron2 (e.g. detectron2 built from upstream git): they are then reused.
VENV_FLAGS := $(if $(USDET_SYSTEM_SITE),--system-site-packages,)
QUIET_PIP := grep -v -e "is ignored: it is neither" || true

.PHONY: setup test demo bench train-busi-cpu train-busi-gpu clean-venv

setup: $(STAMP)

$(STAMP): setup.py requirements.txt tools/install_detectron2.py
	@test -x $(PY) || python3 -m venv $(VENV_FLAGS) $(VENV)
	@$(PY) -c "import torch, torchvision" 2>/dev/null || \
	  { echo "installing torch 2.14.1 / torchvision 0.29.1"; \
	    $(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 2>&1 | $(QUIET_PIP); }
	@$(PY) -m pip install -q -r requirements.txt 2>&1 | $(QUIET_PIP)
	@$(PY) -c "import detectron2.engine, detectron2.model_zoo" 2>/dev/null || \
	  $(PY) tools/install_detectron2.py 2>&1 | $(QUIET_PIP)
	@$(PY) -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | $(QUIET_PIP)
	@$(PY) -c "import detectron2, usdet; print('usdet set up: detectron2', detectron2.__version__)"
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests

demo: setup
	$(PY) tools/demo.py --output output/demo

bench: setup
	$(PY) benchmarks/run_all.py

clean-venv:
	rm -rf $(VENV)
