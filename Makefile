# Every target bootstraps .venv itself, so a fresh clone needs only Python 3.10+ and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 9000
DATA ?= ./var

.PHONY: run test demo bench clean fuzz crash-test hostile-test mutation-test

$(BIN)/twistd: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --config-settings editable_mode=compat -e '.[test]'
	@touch $@

run: $(BIN)/twistd
	mkdir -p $(DATA)
	$(BIN)/twistd --nodaemon --pidfile= mailrelay --port tcp:$(PORT):interface=127.0.0.1 --data $(DATA)

test: $(BIN)/twistd
	$(BIN)/trial --jobs=2 tests

demo: $(BIN)/twistd
	$(BIN)/python -m mailrelay.demo

# Throughput and latency of the relay against a bare forwarder and Mosquitto
# (bench/README.md); results in bench/results/.  CI passes BENCH_FLAGS=--quick.
$(VENV)/.bench-installed: $(BIN)/twistd pyproject.toml
	$(BIN)/pip install --quiet --config-settings editable_mode=compat -e '.[bench]'
	@touch $@

bench: $(VENV)/.bench-installed
	$(BIN)/python bench/run.py $(BENCH_FLAGS)

# The delivery promises under SIGKILL (docs/operations.md): 10,000 messages and
# 20 relay crashes by default; CI passes a smaller CRASH_FLAGS.
crash-test: $(BIN)/twistd
	$(BIN)/python tools/crash_test.py $(CRASH_FLAGS)

# The limits under attack, next to a well-behaved pair; HOSTILE_FLAGS=--quick for CI.
hostile-test: $(BIN)/twistd
	$(BIN)/python tools/hostile.py $(HOSTILE_FLAGS)

# Fuzzing (fuzz/README.md): each target runs FUZZ_SECONDS; an input that takes
# longer than FUZZ_TIMEOUT seconds counts as a hang.  Inputs found and crash
# files go under FUZZ_OUT, never into the committed seed corpora.
FUZZ_SECONDS ?= 60
FUZZ_TIMEOUT ?= 5
FUZZ_OUT ?= build/fuzz
FUZZ_TARGETS := fuzz_frames fuzz_envelope

$(VENV)/.fuzz-installed: $(BIN)/twistd pyproject.toml
	$(BIN)/pip install --quiet --config-settings editable_mode=compat -e '.[fuzz]'
	@touch $@

fuzz: $(VENV)/.fuzz-installed
	@status=0; for target in $(FUZZ_TARGETS); do \
	  mkdir -p $(FUZZ_OUT)/$$target/corpus || exit 1; \
	  echo "== $$target: $(FUZZ_SECONDS) s, findings in $(FUZZ_OUT)/$$target/"; \
	  $(BIN)/python fuzz/$$target.py -max_total_time=$(FUZZ_SECONDS) \
	    -timeout=$(FUZZ_TIMEOUT) -print_final_stats=1 \
	    -artifact_prefix=$(FUZZ_OUT)/$$target/ \
	    $(FUZZ_OUT)/$$target/corpus fuzz/corpus/$$target || status=1; \
	done; exit $$status

# Mutation testing of the checks that decide what is accepted (tools/mutation.py,
# scope and tests in tools/mutation.toml): fails on a surviving mutant that
# tests/mutation-survivors.toml does not accept.  The whole run takes tens of
# minutes; CI passes MUTATION_FLAGS="--sample N --seed 1" (a fixed sample of the
# trust modules' mutants).  It mutates a copy under build/mutation/.
$(VENV)/.mutation-installed: $(BIN)/twistd pyproject.toml
	$(BIN)/pip install --quiet --config-settings editable_mode=compat -e '.[mutation]'
	@touch $@

mutation-test: $(VENV)/.mutation-installed
	$(BIN)/python tools/mutation.py $(MUTATION_FLAGS)

clean:
	rm -rf $(VENV) _trial_temp* twisted/plugins/dropin.cache build
