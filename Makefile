# Two commands on a fresh machine: `make demo` and `make test` (see README.md).
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
DEVSTAMP := $(VENV)/.installed-dev
CLIP_RETRIEVAL_VERSION := 2.44.0
CLIP_RETRIEVAL := .cache/clip-retrieval
CRSTAMP := $(CLIP_RETRIEVAL)/.installed-$(CLIP_RETRIEVAL_VERSION)
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE ?= 1

.PHONY: setup test test-fast lint demo bench clean browser

setup: $(STAMP)

# torch/torchvision first, pinned by constraints.txt so no later install can move them;
# GPU users: see README "Bring your own CUDA torch". The runtime (requirements.txt) and
# the service/ONNX extras (requirements-serve.txt) for the demo; test tooling on top for
# `make test` (requirements-dev.txt).
$(STAMP): requirements.txt requirements-serve.txt constraints.txt pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(VPY) -m pip install -q -c constraints.txt -r requirements.txt -r requirements-serve.txt
	$(VPY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

$(DEVSTAMP): $(STAMP) requirements-dev.txt requirements-trackers.txt
	$(VPY) -m pip install -q -c constraints.txt -r requirements-dev.txt
	touch $(DEVSTAMP)

# clip-retrieval's own client and built front end, which tests/test_clip_retrieval.py runs
# against our service: in a folder of its own, without its dependencies (it pins numpy<2;
# its client needs only requests, pinned in requirements-dev.txt)
$(CRSTAMP): | $(STAMP)
	rm -rf $(CLIP_RETRIEVAL)
	$(VPY) -m pip install -q --no-deps --target $(CLIP_RETRIEVAL) clip-retrieval==$(CLIP_RETRIEVAL_VERSION)
	touch $(CRSTAMP)

# the linter, in seconds (part of make test)
lint: $(DEVSTAMP)
	$(VENV)/bin/ruff check phoclip train sharding launch tests bench

# both print the slowest tests and the whole run's test time (issue #25: <= 15 min for
# `make test`, <= 3 min for `make test-fast` on a 2-core machine)
test test-fast: export CLIP_RETRIEVAL_DIR := $(CURDIR)/$(CLIP_RETRIEVAL)
test: $(DEVSTAMP) $(CRSTAMP) lint browser
	@t0=$$(date +%s); $(VPY) -m pytest -q --durations=15 tests; rc=$$?; \
	  echo "make test: $$(( $$(date +%s) - t0 )) s of test time (exit $$rc)"; exit $$rc

# the service's browser test drives Debian's Chromium through its driver; installed
# here when missing and we are root (CI), else that one test says why it skips
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq chromium chromium-driver >/dev/null) || \
	    echo "chromium not installed (needs root): the browser test will skip"; }

test-fast: $(DEVSTAMP) $(CRSTAMP) lint
	@t0=$$(date +%s); $(VPY) -m pytest -q --durations=10 -m "not slow" tests; rc=$$?; \
	  echo "make test-fast: $$(( $$(date +%s) - t0 )) s of test time (exit $$rc)"; exit $$rc

demo: $(STAMP)
	$(VPY) launch/demo.py $(DEMO_ARGS)

bench: $(STAMP)
	$(VPY) -m pip install -q -c constraints.txt -r bench/requirements.txt
	$(VPY) bench/run_all.py

clean:
	rm -rf runs demo_out .pytest_cache
