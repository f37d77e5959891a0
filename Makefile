# Two commands set up and run everything on a fresh machine:
#   make demo   - install into .venv, then run moetool on the bundled fixtures
#   make test   - install into .venv, then run the fast test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
MOETOOL := $(VENV)/bin/moetool
# torch first and pinned: an unpinned torch pulls several GB of CUDA wheels
TORCH_PIN := torch==2.13.0

.PHONY: install demo test test-all fixtures trained-fixtures bench quality clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH_PIN)
	$(PIP) install --quiet -e ".[test]"
	touch $@

demo: install
	$(MOETOOL) params mixtral
	$(MOETOOL) params fixtures/tiny-deepseek-v3
	mkdir -p out
	$(MOETOOL) trace fixtures/trained-mixtral --file fixtures/corpus/heldout-code.txt --max-tokens 2000 \
		--out out/demo-trace.safetensors --plot out/demo-heatmap.png
	@echo "demo outputs in out/: demo-trace.safetensors (moetool trace show out/demo-trace.safetensors), demo-heatmap.png"

test: install
	$(PY) -m pytest -q -m "not slow"

test-all: install
	$(PY) -m pytest -q

fixtures: install
	$(PY) fixtures/make_tiny.py

# the corpus and the two trained fixtures (about 5 minutes each on 2 CPU cores)
trained-fixtures: install
	$(PY) fixtures/build_corpus.py
	$(PY) fixtures/train_tiny.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# speed and memory rows -> docs/benchmarks.md (writes, then removes, a 5.8 GB checkpoint in bench/work)
bench: install
	$(PY) bench/run.py

# compression and distillation quality on the trained fixtures -> docs/compression.md, docs/distill.md
quality: install
	$(PY) bench/quality_compression.py
	$(PY) bench/quality_distill.py
