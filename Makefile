# Two commands set everything up on a fresh machine:
#   make demo   - create .venv, install, run the simulated neighbourhood (about 5 minutes)
#   make test   - create .venv, install with test extras, run unit and HIL tests
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test unit hil bench clean venv system-deps demo-deps evm-tools

# Debian packages, as command:package pairs (an absolute path must be executable; "+" joins
# two packages). The demo needs only socat, which joins the emulators' pseudo-terminals into
# virtual serial lines. The tests also need OpenSSH (client and a loopback server: the
# provisioning/flashing target), systemd-analyze (verifies the unit files; nothing is started)
# and npm (the EVM toolchain).
DEMO_NEEDS := socat:socat
TEST_NEEDS := $(DEMO_NEEDS) ssh:openssh-client /usr/sbin/sshd:openssh-server systemd-analyze:systemd npm:nodejs+npm

define apt_install
	@missing=""; \
	for pair in $(1); do \
	  cmd=$${pair%%:*}; pkg=$${pair#*:}; \
	  case "$$cmd" in /*) test -x "$$cmd" && continue;; *) command -v "$$cmd" >/dev/null 2>&1 && continue;; esac; \
	  missing="$$missing $$(echo "$$pkg" | tr + ' ')"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  elif command -v sudo >/dev/null 2>&1; then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "missing Debian packages:$$missing (install them with apt-get)" >&2; exit 1; fi; \
	fi
endef

demo-deps:
	$(call apt_install,$(DEMO_NEEDS))

system-deps:
	$(call apt_install,$(TEST_NEEDS))

$(STAMP): pyproject.toml | system-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[host,test,bench]'
	touch $(STAMP)

venv: $(STAMP)

# The EVM toolchain, pinned in contracts/package-lock.json: the anvil node (started by its binary
# path, stopped by pid) and solc-js. Installed into contracts/node_modules (not committed).
EVM_STAMP := contracts/node_modules/.installed
$(EVM_STAMP): contracts/package.json contracts/package-lock.json | system-deps
	cd contracts && npm ci --no-audit --no-fund --loglevel=error
	touch $(EVM_STAMP)

evm-tools: $(EVM_STAMP)

# The demo installs only what it runs: the board's dependencies and the host extra (the bench
# ledger's HTTP server), and only socat from Debian; `make test` adds the rest.
DEMO_STAMP := $(VENV)/.installed-demo
$(DEMO_STAMP): pyproject.toml | demo-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[host]'
	touch $(DEMO_STAMP)

demo: demo-deps $(DEMO_STAMP)
	$(VENV)/bin/dgc-host demo

# The whole suite on the default rig (emulators on ptys), then the rig-portable device tests
# once more on the MicroPython bench-board emulators under the Unix port (the only run of the
# driver suites against them; the real-daemon tests, marked daemon, run in the first pass only).
#
# The first pass runs on three workers (pytest-xdist, one test file per worker at a time) on the
# 2-core machine: most of the suite waits on real time (slot edges, router watchdogs, block
# intervals), not on the CPU (about 15 CPU-minutes in a 17-minute run on two workers, load
# average below 1). The real-time tests wait for conditions, not fixed sleeps, and passed at
# load averages of 3.5-6.9 (two workers beside a soak and benchmarks). The
# longest files go out first (hil_tests/suite_order.py; --no-loadscope-reorder keeps that order
# instead of xdist's sort by number of tests, which left the 3-minute files for the end).
# The driver suites that assert real-time bounds on the bus (request gaps, timeouts, a dead
# meter not delaying live ones, read times and 3.5-character framing of the MicroPython
# emulators) run alone in the second pass, so a neighbour's load never
# decides them.
TEST_WORKERS ?= 3
TIMING_TESTS := hil_tests/test_meter_driver.py hil_tests/test_meter_faults.py hil_tests/test_dgr_driver.py \
	hil_tests/test_micropython_emulators.py
test: system-deps $(STAMP) $(EVM_STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(addprefix --ignore=,$(TIMING_TESTS))
	$(PY) -m pytest -q $(TIMING_TESTS)
	$(PY) -m pytest -q hil_tests --rig hil_tests/rigs/micropython.toml -m "rig_portable and not daemon"

unit: $(STAMP) $(EVM_STAMP)
	$(PY) -m pytest -q tests

hil: $(STAMP)
	$(PY) -m pytest -q hil_tests

bench: $(STAMP)
	for script in bench/*.py; do $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) var build *.egg-info
