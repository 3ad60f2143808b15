# Entry points. `make test` is the README's test command and what .ci/run ends with.
SHELL := /bin/bash
VENV ?= .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: test lint unit images molecule molecule-default molecule-dify venv demo demo-down bench

venv: $(VENV)/.installed
$(VENV)/.installed: requirements-dev.txt bridge/requirements.txt bridge/pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements-dev.txt -e bridge
	touch $@

test: lint unit molecule

lint: venv
	ruff check bridge molecule scripts bench
	ruff format --check bridge molecule scripts bench
	yamllint -s .
	ansible-lint --profile production
	scripts/gixy-rendered

unit: venv
	cd bridge && pytest -q

images: venv
	scripts/build-images

molecule: molecule-default molecule-dify

molecule-default: venv images
	molecule test -s default

# roles/dify's install -> upgrade -> refused downgrade -> restore, on the Dify stand-in release.
molecule-dify: venv images
	molecule test -s dify-upgrade

# The README's main-job command: the whole stack on a local server container, plus a sample conversation.
demo: venv
	scripts/demo

demo-down: venv
	molecule destroy -s default

# The deployed stack's benchmarks (run `make demo` first): prints numbers, see docs/benchmarks.md.
bench: venv
	python bench/stack_bench.py
