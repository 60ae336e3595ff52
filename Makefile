# TinySQL activation-patching suite. `make test` and `make run` work on a fresh machine (CPU, offline).
PYTHON_BOOT ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
# CPU torch by default (lies on disk here, small); GPU users: make TORCH_SPEC=torch or use their own venv.
TORCH_SPEC  ?= torch==2.13.0

.PHONY: venv test

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest

# Sweep of the feature notebooks over a parameter grid (papermill): make sweep [PARAMS=params/x.yaml] [JOBS=N]
PARAMS ?= params/default.yaml
JOBS   ?= 1
.PHONY: sweep run
sweep: venv
	$(PY) scripts/sweep.py --params $(PARAMS) --jobs $(JOBS)

# The main job: the default sweep on the embedded models, offline, CPU -> outputs/default/index.html
run:
	$(MAKE) sweep PARAMS=params/default.yaml
