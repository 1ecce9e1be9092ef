# waso — common tasks. `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/bin:$(PATH)

.PHONY: help setup tools image krew cluster-up cluster-down crds test lint format bench bench-operator bench-runtime demo kind

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

setup: ## install Debian packages and the virtualenv (.venv)
	bash hack/setup.sh

tools: ## build etcd, the control plane, the node (kubelet, kube-proxy, containerd, CoreDNS, pause), kubectl, helm, ferretdb, promtool
	bash hack/build-tools.sh

image: ## build waso's image (buildah here, docker elsewhere) and its archive bin/waso-image.tar for the node
	bash hack/build-image.sh

cluster-up: ## start a local control plane and its node (kubeconfig: .cluster/kubeconfig, context waso-local)
	$(PY) hack/localcluster.py up

cluster-down: ## stop the local control plane and remove its data
	$(PY) hack/localcluster.py down

demo: tools image ## local cluster with a real node, waso installed by Helm, the sample tenants; Ctrl-C stops it
	PYTHONPATH=hack $(PY) hack/demo.py

kind: ## the same install on kind (needs a Docker engine and kind; not on machines without Docker)
	bash hack/kind.sh

crds: ## regenerate crds/ from the models in waso/api
	$(PY) hack/gen_crds.py

lint: ## ruff, mypy and the import-layer contracts
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

format: ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint image krew ## lint, then every test against a fresh local cluster with a real node, and Redis
	$(PY) -m pytest

KREW_HOMEPAGE ?= https://github.com/waso-dev/waso
krew: image ## the kubectl plugin for krew: dist/krew/waso.yaml and its archive (a PEX of waso, from the image's wheels)
	$(PY) hack/krew.py --homepage $(KREW_HOMEPAGE)

bench: bench-operator bench-runtime ## every benchmark

bench-operator: ## 1000 sessions in 100 namespaces: operator time, peak RSS, ratio to a plain-client floor
	PYTHONPATH=hack $(PY) hack/bench_operator.py

bench-runtime: ## runtime memory per session (simulator, neonize) and message throughput against a floor
	PYTHONPATH=hack $(PY) hack/bench_runtime.py
