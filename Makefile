# Two commands for a fresh machine:  make demo  (the main job)  and  make test.
# Both install what they need into .venv first: torch 2.13.0 (the CPU build where there is no GPU, so no
# CUDA packages are pulled in), then chatforge itself in editable mode with its test extras.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
RUN    ?= runs/demo
DATA   ?= $(RUN)/data

.PHONY: demo test venv bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

test: venv
	$(PY) -m pytest -q

# The demo so far: zero-install corpus -> BPE tokenizer -> token shards -> pretrain the cpu preset -> generate.
demo: venv
	$(VENV)/bin/chatforge data sample-corpus --out $(DATA)/corpus.jsonl
	$(VENV)/bin/chatforge tokenizer train $(DATA)/corpus.jsonl --vocab-size 4096 --out $(DATA)/tokenizer
	$(VENV)/bin/chatforge data prepare $(DATA)/corpus.jsonl --tokenizer $(DATA)/tokenizer --out $(DATA)/shards --val-fraction 0.05
	$(VENV)/bin/chatforge pretrain --preset cpu --data $(DATA)/shards --out $(RUN)/pretrain
	$(VENV)/bin/chatforge generate $(RUN)/pretrain --prompt "The for statement" --max-new-tokens 80 --temperature 0.7 --top-k 40 --seed 0

bench: venv
	$(PY) bench/pretrain_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
