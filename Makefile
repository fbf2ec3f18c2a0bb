# jetyolo: the only place install steps live. `make demo` and `make test` work on a fresh machine.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := .stamps/install
export YOLO_OFFLINE := 1
export JETYOLO_HOME := $(CURDIR)/.jetyolo
export YOLO_CONFIG_DIR := $(JETYOLO_HOME)/ultralytics
export PYTHONUNBUFFERED := 1
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO := .work/demo

.PHONY: install test lint demo bench rootfs-install service-demo clean

install: $(STAMP)

# Debian packages (mosquitto broker for MQTT tests and the demo, systemd-analyze for unit checks),
# then the venv with every extra. Re-runs only when pyproject.toml changes.
$(STAMP): pyproject.toml
	@if ! command -v mosquitto >/dev/null || ! command -v mosquitto_sub >/dev/null \
	   || ! command -v systemd-analyze >/dev/null; then \
	  echo "installing Debian packages: mosquitto mosquitto-clients systemd"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq mosquitto mosquitto-clients systemd; \
	fi
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[host,device,dev]'
	@mkdir -p $(dir $@) && touch $@

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check host device tests
	$(BIN)/mypy

clean:
	rm -rf .work runs .pytest_cache .mypy_cache .ruff_cache
