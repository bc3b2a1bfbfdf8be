# Two commands do everything on a fresh machine: `make run` and `make test`.
# Each target sets up what it needs (virtual environment, dependencies, stubs).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PROTOS := $(shell find protos -name '*.proto')

.PHONY: setup protos run test bench lint clean

setup: $(VENV)/.installed protos

# Reinstall only when the dependency list changes.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	# The generated stubs import as devops_hub.v1.*: put gen/ on the venv's path.
	$(PY) -c 'import pathlib, sysconfig; pathlib.Path(sysconfig.get_paths()["purelib"], "devops_hub_gen.pth").write_text(str(pathlib.Path("gen").resolve()) + "\n")'
	touch $@

protos: gen/.stamp

gen/.stamp: $(PROTOS) $(VENV)/.installed scripts/gen_protos.py
	$(PY) scripts/gen_protos.py
	touch $@

run: setup
	$(PY) -m services.launcher

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) -m bench.run

lint: setup
	$(PY) -m compileall -q services gateway tests bench

clean:
	rm -rf $(VENV) gen var .pytest_cache
