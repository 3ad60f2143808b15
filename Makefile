# Entry points. `make test` is the README's test command and what .ci/run ends with.
SHELL := /bin/bash
VENV ?= .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: test test-stages lint unit images molecule molecule-default molecule-dify venv demo demo-down bench

venv: $(VENV)/.installed
$(VENV)/.installed: requirements-dev.txt bridge/requirements.txt bridge/pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements-dev.txt -e bridge
	touch $@

REPORTS := $(CURDIR)/.cache/reports

# Every stage (lint, unit, each molecule scenario) runs even after another failed (--keep-going), so one
# CI run reports all that is broken; the failed tests are then printed again at the very end, where a
# truncated CI log still shows them. Stages that need a failed one (images) are skipped.
test:
	@rm -rf $(REPORTS)
	@$(MAKE) --no-print-directory --keep-going test-stages || { scripts/test-digest $(REPORTS); exit 1; }

test-stages: lint unit molecule

# Every linter runs, so that one run lists every finding; the target fails if any of them did.
LINTERS := \
	"ruff check bridge molecule scripts scripts/test-digest bench" \
	"ruff format --check bridge molecule scripts scripts/test-digest bench" \
	"yamllint -s ." \
	"ansible-lint --profile production" \
	"scripts/gixy-rendered" \
	"mypy --config-file bridge/pyproject.toml bridge/src/wecom_bridge" \
	"lint-imports --config bridge/pyproject.toml"

lint: venv
	@failed=(); for linter in $(LINTERS); do echo "$$linter"; $$linter || failed+=("$$linter"); done; \
	if (( $${#failed[@]} )); then printf 'lint failed: %s\n' "$${failed[@]}"; exit 1; fi

unit: venv
	cd bridge && pytest -q --junitxml=$(REPORTS)/unit.xml

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
