# Two commands do everything on a fresh machine: `make run` and `make test`.
# Each target sets up what it needs (virtual environment, dependencies, stubs).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PROTOS := $(shell find protos -name '*.proto')
CLIENT := clients/python
STUBS  := $(CLIENT)/devops_hub/v1
DIST   ?= dist

.PHONY: setup protos run test test-fast bench bench-cache lint clean key ghz loadtest dist

setup: $(VENV)/.installed protos

# Reinstall only when the dependency list changes.
$(VENV)/.installed: pyproject.toml $(CLIENT)/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	# The client package (devops_hub: its code and the stubs `make protos` generates
	# into it) imports from its folder: put clients/python on the venv's path, ahead of
	# any older stubs; its editable install adds the devops-hub command to .venv/bin.
	$(PY) -c 'import pathlib, sysconfig; pathlib.Path(sysconfig.get_paths()["purelib"], "devops_hub_gen.pth").write_text(str(pathlib.Path("$(CLIENT)").resolve()) + "\n")'
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e $(CLIENT)
	touch $@

# One generation: the stubs go into the client package, where the services import
# them from and where its wheel's build puts them too.
protos: $(STUBS)/.stamp

$(STUBS)/.stamp: $(PROTOS) $(VENV)/.installed $(CLIENT)/gen_protos.py
	$(PY) $(CLIENT)/gen_protos.py
	touch $@

# The client's wheel (devops-hub-client: stubs, protos, asyncio client, CLI) in $(DIST)/,
# built with the venv's setuptools and grpcio-tools (no download); docs/client.md.
dist: setup
	$(PY) -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir $(DIST) $(CLIENT)
	@ls $(DIST)/devops_hub_client-*.whl

run: setup
	$(PY) -m devstack.launcher

# Everything, on TEST_WORKERS processes (pytest-xdist; each worker has a PostgreSQL
# database of its own, and every test its own Redis prefix, ports and processes).
# More workers than cores: most of a test's time is waiting on the processes it
# starts. Tests are handed out one at a time, the ones marked slow first; the tests
# of one xdist_group run on one worker, one after another: a module with a
# module-scoped stack, and the tests on the machine's Redis, last (tests/conftest.py,
# tests/support/xdist_groups.py).
TEST_WORKERS ?= 4
test: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup

# The fast tier, to run first: the tests marked `fast` (pure unit tests, no servers,
# databases or subprocesses), in well under a minute.
test-fast: setup
	$(PY) -m pytest -m fast

# Prints a new admin API key, once, where the stack finds it (see README). Set-up
# talks on stderr, so that KEY=$$(make -s key) holds the key alone.
key:
	@$(MAKE) --no-print-directory setup >&2
	@$(PY) -m services.agents.new_key

# The hub beside a bare ASGI app, side by side, in three configurations (plain, REDIS_URL,
# WORKERS=2): tables on stdout, the chart in bench/results.png; about ten minutes.
# BENCH_ARGS=--quick is a smoke run of a minute or two (python -m bench.run --help).
bench: setup
	$(PY) -m bench.run $(BENCH_ARGS)

bench-cache: setup
	$(PY) -m bench.cache_bench

# ghz, from its docker image, against a running stack (`make run`, or the compose
# stack): every deploy/ghz/*.json config, resolved by server reflection, each JSON
# report kept in $(GHZ_REPORTS). GHZ_API_KEY=<admin key> sends it with every call
# (ExecuteWorkflow needs one); raise the target's RATE_LIMIT_REQUESTS for a load test.
DOCKER      ?= docker
GHZ_IMAGE   ?= ghcr.io/bojand/ghz:0.120.0
GHZ_REPORTS ?= var/ghz
ghz: setup
	@command -v $(DOCKER) >/dev/null || { echo "make ghz needs docker, which is not installed: run make loadtest instead (the same calls with h2load)"; exit 1; }
	@$(DOCKER) info >/dev/null 2>&1 || { echo "make ghz needs a running docker daemon, and docker info reaches none: start it, or run make loadtest instead (the same calls with h2load)"; exit 1; }
	mkdir -p $(GHZ_REPORTS)
	@set -e; for config in deploy/ghz/*.json; do \
	    name=$$(basename $$config .json); \
	    echo "ghz: $$name"; \
	    $(DOCKER) run --rm --network host --user $$(id -u):$$(id -g) \
	        -v $(CURDIR)/deploy/ghz:/ghz:ro -v $(CURDIR)/$(GHZ_REPORTS):/reports \
	        $(GHZ_IMAGE) --config /ghz/$$name.json --format json --output /reports/$$name.json \
	        $(if $(GHZ_API_KEY),--metadata '{"x-api-key": "$(GHZ_API_KEY)"}'); \
	done
	$(PY) -m bench.loadtest --summarize $(GHZ_REPORTS)/*.json

# The same calls without docker: h2load with gRPC framing, ghz-like figures. Starts a
# stack of its own; LOADTEST_ARGS="--running --api-key KEY" loads `make run`'s instead.
loadtest: setup
	$(PY) -m bench.loadtest $(LOADTEST_ARGS)

# ruff (rules in pyproject.toml) everywhere; mypy on what [tool.mypy] lists.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy

clean:
	rm -rf $(VENV) $(STUBS) $(CLIENT)/devops_hub/protos $(CLIENT)/build $(CLIENT)/*.egg-info dist var .pytest_cache
