# Every target bootstraps .venv itself, so a fresh clone needs only Python 3.10+ and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 9000
DATA ?= ./var

.PHONY: run test demo bench clean

$(BIN)/twistd: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --config-settings editable_mode=compat -e '.[test]'
	@touch $@

run: $(BIN)/twistd
	mkdir -p $(DATA)
	$(BIN)/twistd --nodaemon --pidfile= mailrelay --port tcp:$(PORT) --data $(DATA)

test: $(BIN)/twistd
	$(BIN)/trial --jobs=2 tests

demo: $(BIN)/twistd
	$(BIN)/python -m mailrelay.demo

bench: $(BIN)/twistd
	$(BIN)/python bench/load.py

clean:
	rm -rf $(VENV) _trial_temp* twisted/plugins/dropin.cache
