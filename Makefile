# The front door: `make demo` and `make test` each set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DATA := data
SYNTH := $(DATA)/synthetic
PREPARED := $(DATA)/prepared
RUN := runs/demo

.PHONY: venv demo test lint bench bench-gpu gpu-suite pairings clean-demo

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

# The demo's run: configs/demo.yaml (resnet18 + sae with degraded views on the 128×64 synthetic set, from random
# weights), about 3 minutes on 2 CPU cores (the whole demo 4 min on a fresh clone).
DEMO_CONFIG := configs/demo.yaml

demo: $(STAMP)
	$(PY) prepare.py --synthetic $(SYNTH) --out $(PREPARED) --val-ids 20
	test -f $(RUN)/summary.json || $(PY) train.py --config $(DEMO_CONFIG) --data $(PREPARED) --result-dir $(RUN) \
		$$(test -f $(RUN)/checkpoint.pt && echo --resume)
	$(PY) eval.py --result-dir $(RUN)
	$(PY) topk.py --result-dir $(RUN) --k 10
	@echo "top-k grids: $(RUN)/topk/index.html"

test: $(STAMP)
	$(PY) -m pytest tests

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) bench/data_pipeline.py
	$(PY) bench/eval_speed.py --rerank
	$(PY) bench/train_throughput.py
	$(PY) bench/model_step.py
	$(PY) bench/image_check.py

# On a CUDA machine: training images/s with bf16 autocast at 256×128, batch 16×4, for resnet50 with the tensor
# loader (and a --compile row in the same run), the PIL loader, and the seed's two reference backbones, and the
# model step of every family's seed backbone; figures also in runs/bench/*.json. The first run generates the 751-identity synthetic
# set into data/bench-train751-seed0/ (about two minutes); the others reuse it.
bench-gpu: $(STAMP)
	$(PY) bench/train_throughput.py --device cuda --compile-row --json runs/bench/train_throughput_resnet50.json
	$(PY) bench/train_throughput.py --device cuda --json runs/bench/train_throughput_resnet50_pil.json -- --loader pil
	$(PY) bench/train_throughput.py --device cuda --backbone resnet152 --json runs/bench/train_throughput_resnet152.json
	$(PY) bench/train_throughput.py --device cuda --backbone swin_b --json runs/bench/train_throughput_swin_b.json
	$(PY) bench/model_step.py --device cuda --seed-list --json runs/bench/model_step_cuda.json

# On a CUDA machine: docs/benchmarks.md's "On one GPU" figures, in order of priority under a time budget (seconds),
# resumable: the step and loader, the model step, the Market-size schedule, evaluation, the seed's grid.
GPU_SECONDS := 540

gpu-suite: $(STAMP)
	PYTHON=$(PY) bash bench/gpu_suite.sh runs/gpu $(GPU_SECONDS)

# Every backbone × autoencoder pairing under one budget (the CPU list; add --seed-list on a GPU): docs/results.md's
# table. Finished pairings are skipped, so it resumes; results in runs/pairings/pairings.md and pairings.png.
PAIRINGS := --img-size 64 32 --epochs 2 --lr 1e-3 --lr-classifier 1e-2 --warmup-epochs 1

pairings: $(STAMP)
	$(PY) studies/pairings.py $(PAIRINGS)

clean-demo:
	rm -rf $(RUN) $(PREPARED) $(SYNTH)
