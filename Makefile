# Entry points. `make test` is the README's test command and what .ci/run ends with.
SHELL := /bin/bash
VENV ?= .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: test test-stages prerequisites lint unit images collection molecule molecule-default molecule-dify molecule-multihost molecule-aibot venv demo demo-down bench

# The host's own prerequisites (Docker engine, debootstrap, python3-venv, Chromium), installed when
# missing and the engine started when it is not running: see scripts/host-prerequisites.
prerequisites:
	scripts/host-prerequisites

venv: $(VENV)/.installed
$(VENV)/.installed: requirements-dev.txt bridge/requirements.txt bridge/pyproject.toml | prerequisites
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements-dev.txt -e bridge
	touch $@

REPORTS := $(CURDIR)/.cache/reports

# Every stage (lint, unit, each molecule scenario) runs even after another failed (--keep-going), so one
# CI run reports all that is broken; the failed tests are then printed again at the very end, where a
# truncated CI log still shows them. Stages that need a failed one (images) are skipped.
test: prerequisites
	@rm -rf $(REPORTS)
	@$(MAKE) --no-print-directory --keep-going test-stages || { scripts/test-digest $(REPORTS); exit 1; }

test-stages: lint unit molecule

# Every linter runs, so that one run lists every finding; the target fails if any of them did.
# ansible-lint's syntax check resolves wecom.dify.* in the molecule playbooks: the collection comes first.
LINTERS := \
	"ruff check bridge molecule plugins scripts scripts/test-digest scripts/role-defaults bench" \
	"ruff format --check bridge molecule plugins scripts scripts/test-digest scripts/role-defaults bench" \
	"scripts/role-defaults --check" \
	"yamllint -s ." \
	"ansible-lint --profile production" \
	"scripts/gixy-rendered" \
	"mypy --config-file bridge/pyproject.toml bridge/src/wecom_bridge" \
	"lint-imports --config bridge/pyproject.toml"

lint: venv collection
	@failed=(); for linter in $(LINTERS); do echo "$$linter"; $$linter || failed+=("$$linter"); done; \
	if (( $${#failed[@]} )); then printf 'lint failed: %s\n' "$${failed[@]}"; exit 1; fi

unit: venv
	cd bridge && pytest -q --junitxml=$(REPORTS)/unit.xml

images: venv
	scripts/build-images

# The collection artifact, installed into .cache/collections: what molecule and the demo converge through.
collection: venv
	scripts/build-collection

molecule: molecule-default molecule-dify molecule-multihost molecule-aibot

molecule-default: venv images collection
	molecule test -s default

# The AI bot on its long connection without an edge (the README's fastest path), kill -9 mid-answer.
molecule-aibot: venv images collection
	molecule test -s aibot

# roles/dify's install -> upgrade -> refused downgrade -> restore, on the Dify stand-in release.
molecule-dify: venv images collection
	molecule test -s dify-upgrade

# Several servers: an edge, two bridge hosts sharing a PostgreSQL host, WeCom and Dify outside; faults mid-burst.
molecule-multihost: venv images collection
	molecule test -s multihost

# The README's main-job command: the whole stack on a local server container, plus a sample conversation.
demo: prerequisites venv
	scripts/demo

demo-down: venv
	molecule destroy -s default

# The deployed stack's benchmarks (run `make demo` first): prints numbers, see docs/benchmarks.md.
bench: venv
	python bench/stack_bench.py
