# Two commands set up and run everything on a fresh machine:
#   make demo   - install into .venv, then run moetool on the bundled fixtures
#   make test   - install into .venv, then run the fast test suite
# .venv gets the exact versions in requirements.lock (every package, transitive ones included);
# pyproject.toml keeps ranges for people who install moetool into their own environment.
#   make lock         - regenerate requirements.lock from a clean venv (newest releases the ranges allow)
#   make test-latest  - the fast suite against the newest releases the ranges allow, in .venv-latest
#   make test-lowest  - the fast suite against the lowest transformers/accelerate the ranges allow, in .venv-lowest
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
MOETOOL := $(VENV)/bin/moetool
LOCK   := requirements.lock
# torch first and pinned: an unpinned torch pulls several GB of CUDA wheels
TORCH_PIN := torch==2.13.0
# the installer: uv (pinned in the lock), installed with pip: a fresh-clone `make install` took 31 s
# here against 100 s with pip (same machine, same load)
UV_PIN := $(shell sed -n 's/^\(uv==[^ ]*\).*/\1/p' $(LOCK))
# uv does not read pip's configuration: hand it the wheel folders pip is told to look in (where
# this machine keeps its CPU build of torch), so that torch comes from the same file pip takes
FIND_LINKS := $(foreach d,$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null),--find-links $(d))
UV = $(1)/bin/uv pip install --quiet --python $(1)/bin/python $(FIND_LINKS)
# the lowest versions pyproject.toml allows for the libraries whose internals moetool touches
LOWEST := transformers==5.24.0 accelerate==1.16.0 bitsandbytes==0.50.2

.PHONY: install demo test test-all test-latest test-lowest lock fixtures trained-fixtures bench quality clean

install: $(VENV)/.installed

# exact versions from the lock; torch first (with its dependencies at their locked versions)
$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check $(UV_PIN)
	$(call UV,$(VENV)) -c $(LOCK) $(TORCH_PIN)
	$(call UV,$(VENV)) --no-deps -r $(LOCK)
	$(call UV,$(VENV)) --no-deps --no-build-isolation -e .
	$(PIP) check
	touch $@

# a clean venv: uv, torch pinned first, then moetool and the newest releases its ranges allow
# (or what $(2) asks for)
define fresh_venv
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/pip install --quiet --disable-pip-version-check uv
	$(call UV,$(1)) $(TORCH_PIN)
	echo $(TORCH_PIN) > $(1)/torch-pin.txt
	$(call UV,$(1)) -c $(1)/torch-pin.txt --upgrade pip setuptools -e ".[test]" $(2)
endef

lock:
	$(call fresh_venv,.venv-lock)
	{ sed -n '/^#/p' $(LOCK); .venv-lock/bin/pip freeze --all --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*/\1/'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .venv-lock
	@echo "$(LOCK) refreshed: review 'git diff $(LOCK)', run 'make clean test', commit"

test-latest:
	$(call fresh_venv,.venv-latest)
	@echo "--- versions that differ from $(LOCK):"
	@.venv-latest/bin/pip freeze --all --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*/\1/' | diff $(LOCK) - | sed -n 's/^> /  now /p'
	.venv-latest/bin/python -m pytest -q -m "not slow" -p no:cacheprovider

test-lowest:
	$(call fresh_venv,.venv-lowest,$(LOWEST))
	.venv-lowest/bin/pip check
	.venv-lowest/bin/python -m pytest -q -m "not slow" -p no:cacheprovider

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
	rm -rf $(VENV) .venv-lock .venv-latest .venv-lowest .pytest_cache build *.egg-info

# speed and memory rows -> docs/benchmarks.md (writes, then removes, a 5.8 GB checkpoint in bench/work)
bench: install
	$(PY) bench/run.py

# compression and distillation quality on the trained fixtures -> docs/compression.md, docs/distill.md
quality: install
	$(PY) bench/quality_compression.py
	$(PY) bench/quality_distill.py
