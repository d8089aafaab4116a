# Batch zero-shot image classification with CLIP / Chinese-CLIP.
# Every target that runs code depends on the install stamp, so each works as the first command on a fresh clone.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Shell-quote a Make variable: 'it'\''s' survives spaces, quotes and Unicode.
sq = '$(subst ','\'',$(1))'
# Emit "--flag 'value'" only when the value is set.
flag = $(if $(2),$(1) $(call sq,$(2)))

.DEFAULT_GOAL := help
.PHONY: help install demo test test-fast reliability bench scale fewshot classify precision report clean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  %-12s %s\n", $$1, $$2}'

install: $(STAMP) ## Create .venv with the project (editable) and its test extras

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Exact version first: pip takes the CPU wheel from this disk, never a CUDA build. pyproject.toml asks only
	# torch>=2.6, so the project's install below keeps this torch (as it keeps a CUDA or NPU one elsewhere).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(STAMP) ## Classify the bundled sample images with the bundled tiny model
	$(PY) jobs/classify.py dataset=sample model=tiny_clip labels=shapes

# Two processes, a test module (or a class, where a module splits into classes) each at a time: see
# tests/conftest.py. Most tests wait on the jobs they start, so two share two cores well.
test: $(STAMP) ## Run the whole test suite (what CI runs)
	$(PY) -m pytest -q -n 2 --dist loadscope --durations=15

test-fast: $(STAMP) ## Unit tests and the small integration tests (under 2 minutes): the edit loop
	$(PY) -m pytest -q -m "not slow" tests/unit tests/integration

reliability: $(STAMP) ## Fault-injection suite in full: 24 kill points, image zoo, concurrency, 100k-image memory
	RELIABILITY_FULL=1 $(PY) -m pytest -q tests/reliability

bench: $(STAMP) ## Benchmark: ours vs ceiling vs HF pipeline vs hardware limit, and the CPU runtimes (about 36 min on 2 cores)
	$(PY) jobs/bench.py $(ARGS)

scale: $(STAMP) ## Memory, time and bytes read at 100k, 1M and 10M images (about 30 min on 2 cores)
	$(PY) jobs/scale.py $(ARGS)

fewshot: $(STAMP) ## Top-1 and calibration with 1-16 examples per label on the fixtures (about 5 min on 2 cores)
	$(PY) -m tests.helpers.fewshot_figures $(ARGS)

# NPROC=n: n data-parallel processes through torchrun (one per device); all ranks share one run directory.
ifdef NPROC
LAUNCH = $(PY) -m torch.distributed.run --standalone --nproc_per_node $(NPROC)
OUT ?= outputs/runs/$(shell date +%Y-%m-%d/%H-%M-%S)-x$(NPROC)
else
LAUNCH = $(PY)
endif

classify: $(STAMP) ## make classify DATASET=dir|IMAGE=file MODEL=dir [LABELS=file|LABEL_LIST="a,b"] [TEMPLATE=..] [EXAMPLES=dir|table] [OUT=dir] [DEVICE=..] [DTYPE=..] [RUNTIME=..] [BATCH=n] [TOPK=n] [CACHE=dir] [EMBEDDINGS=1] [NPROC=n] [ARGS=..]
	$(LAUNCH) jobs/classify.py \
	  $(call flag,--dataset_path,$(DATASET)) $(call flag,--input_image,$(IMAGE)) \
	  $(call flag,--model_path,$(MODEL)) $(call flag,--label_file,$(LABELS)) \
	  $(call flag,--label_list,$(LABEL_LIST)) $(call flag,--input_text,$(TEMPLATE)) \
	  $(call flag,--examples,$(EXAMPLES)) $(call flag,--results_save_path,$(OUT)) $(call flag,--device,$(DEVICE)) \
	  $(call flag,--dtype,$(DTYPE)) $(call flag,--runtime,$(RUNTIME)) $(call flag,--batch_size,$(BATCH)) \
	  $(call flag,--topk,$(TOPK)) $(call flag,--cache_dir,$(CACHE)) $(if $(EMBEDDINGS),embeddings=true) $(ARGS)

precision: $(STAMP) ## make precision MODEL=dir DATASET=dir [DEVICE=..] [DTYPE=..] [RUNTIME=..] [BATCH=n] [ARGS=..]: vs torch fp32 CPU
	$(PY) jobs/precision.py \
	  $(call flag,--dataset_path,$(DATASET)) $(call flag,--model_path,$(MODEL)) \
	  $(call flag,--label_file,$(LABELS)) $(call flag,--label_list,$(LABEL_LIST)) \
	  $(call flag,--results_save_path,$(OUT)) $(call flag,--device,$(DEVICE)) \
	  $(call flag,--dtype,$(DTYPE)) $(call flag,--runtime,$(RUNTIME)) $(call flag,--batch_size,$(BATCH)) $(ARGS)

report: $(STAMP) ## Rebuild report.html of an earlier run: make report RUN=dir
	$(PY) jobs/report.py $(call sq,$(RUN))

clean: ## Remove run outputs and the cache (keeps .venv)
	rm -rf outputs/runs outputs/multirun outputs/cache
