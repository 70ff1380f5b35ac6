# usdet: the two commands are `make demo` and `make test`; both set up .venv/ first if needed.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.usdet-setup-stamp
# Set USDET_SYSTEM_SITE=1 to build the venv on top of an environment that already has
# torch and detectron2 (e.g. detectron2 built from upstream git): they are then reused.
VENV_FLAGS := $(if $(USDET_SYSTEM_SITE),--system-site-packages,)
QUIET_PIP := { grep -v -e "is ignored: it is neither" || true; }

.PHONY: setup test demo bench train-busi-cpu train-busi-cpu-baseline train-mixed-cpu train-busi-gpu clean-venv

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

# The from-scratch BUSI recipes (README "Results"). BUSI_ROOT: the raw BUSI folder.
BUSI_ROOT ?= $(or $(USDET_BUSI_ROOT),../shared/data/busi)
datasets/busi/annotations/test.json: | setup
	$(PY) tools/convert_to_coco.py busi --root $(BUSI_ROOT) --output datasets/busi --workers 2 --seed 0

# Train CONFIG into OUTPUT_DIR (with optional KEY VALUE overrides), then evaluate its val-chosen
# checkpoint once on TEST SETS: $(call train_then_test,CONFIG,OUTPUT_DIR,TEST SETS[,OVERRIDES])
define train_then_test
	$(PY) tools/train_net.py --config-file $(1) $(4)
	$(PY) tools/train_net.py --config-file $(1) --eval-only \
	  MODEL.WEIGHTS $(2)/model_best.pth DATASETS.TEST "$(3)" TEST.BOOTSTRAP 1000 OUTPUT_DIR $(2)/test
endef
BUSI_TEST := ('busi_test',)
BOTH_TEST := ('busi_test', 'breast_test')

# The CPU recipe (issue 21): the light detector under a wall-clock budget of CPU_BUDGET_MIN minutes
# (training plus its val evaluations; the LR schedule follows the elapsed time and training stops
# at the budget, on any machine): make train-busi-cpu CPU_BUDGET_MIN=30.0 for another budget.
CPU_BUDGET_MIN ?= 69.0
train-busi-cpu: setup datasets/busi/annotations/test.json
	$(call train_then_test,configs/BUSI/recipe_lite_cpu.yaml,output/busi_recipe_lite_cpu,$(BUSI_TEST),SOLVER.TIME_BUDGET_MIN $(CPU_BUDGET_MIN))

# The previous CPU recipe (issue 13), kept as the named baseline.
train-busi-cpu-baseline: setup datasets/busi/annotations/test.json
	$(call train_then_test,configs/BUSI/recipe_scratch_cpu.yaml,output/busi_recipe_cpu,$(BUSI_TEST))

# BUSI + BrEaST-Lesions-USG (issue 11): the mixed CPU recipe on the light detector and the same
# wall-clock budget (issue 21 item 4), then both test splits.
BREAST_ROOT ?= $(or $(USDET_BREAST_ROOT),../shared/data/breast)
datasets/breast/annotations/test.json: | setup
	$(PY) tools/convert_to_coco.py breast --root $(BREAST_ROOT) --output datasets/breast

train-mixed-cpu: setup datasets/busi/annotations/test.json datasets/breast/annotations/test.json
	$(call train_then_test,configs/BUSI/recipe_mixed_cpu.yaml,output/mixed_recipe_cpu,$(BOTH_TEST),SOLVER.TIME_BUDGET_MIN $(CPU_BUDGET_MIN))

train-busi-gpu: setup datasets/busi/annotations/test.json
	$(call train_then_test,configs/BUSI/recipe_scratch_gpu.yaml,output/busi_recipe_gpu,$(BUSI_TEST))

clean-venv:
	rm -rf $(VENV)
