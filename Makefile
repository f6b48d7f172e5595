# scopewatch — developer entry points. `make help` lists them.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install fetch demo up down status test test-unit test-integration lint clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[1m%-18s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

RELAY := $(BIN)/scopewatch-relay
RELAY_SRC := collectors/native/relay.c

# the native relay of `scopewatch wrap` (without gcc, wrap relays in Python: a warning, not an error)
$(RELAY): $(RELAY_SRC) $(STAMP)
	@if command -v gcc >/dev/null; then \
	  gcc -O2 -Wall -Wextra -Werror -pthread -o $@.tmp $(RELAY_SRC) && mv $@.tmp $@; \
	else echo "warning: no gcc: scopewatch wrap will relay in Python (collectors/native/relay.c not built)"; fi

ROWBINARY := $(VENV)/lib/libscopewatch_avro_rowbinary.so
ROWBINARY_SRC := stream_jobs/native/avro_rowbinary.c

# the sink's Avro -> RowBinary transcoder (without gcc, the sink hands chDB Avro: a warning, not an error)
$(ROWBINARY): $(ROWBINARY_SRC) $(STAMP)
	@if ! command -v gcc >/dev/null; then \
	  echo "warning: no gcc: the sink reads Avro (stream_jobs/native/avro_rowbinary.c not built)"; \
	elif ! echo '#include <openssl/sha.h>' | gcc -E - >/dev/null 2>&1; then \
	  echo "warning: no OpenSSL headers (Debian: libssl-dev): the sink reads Avro (avro_rowbinary.c not built)"; \
	else gcc -O2 -Wall -Wextra -Werror -shared -fPIC -o $@.tmp $(ROWBINARY_SRC) -lcrypto && mv $@.tmp $@; fi

install: $(STAMP) $(RELAY) $(ROWBINARY) ## create .venv and install scopewatch with its dev tools (and build the native relay and the sink's transcoder)

fetch: install ## download Kafka jars (Maven Central) and the npm MCP servers (everything, filesystem, memory) into the cache
	$(BIN)/scopewatch fetch

demo: fetch ## quickstart: bring the local stack up and push real MCP traffic through it
	$(BIN)/scopewatch up
	$(BIN)/scopewatch demo

up: install ## start Kafka, the ClickHouse sink (embedded chDB) and the decision worker
	$(BIN)/scopewatch up

down: ## stop everything `up` started
	$(BIN)/scopewatch down

status: ## show what is running
	$(BIN)/scopewatch status

test: fetch ## run the whole test suite (unit + integration against real Kafka, chDB and MCP servers)
	$(BIN)/python -m pytest -q

test-unit: install ## run the unit tests only (no services)
	$(BIN)/python -m pytest -q tests/unit

test-integration: fetch ## run the integration tests only
	$(BIN)/python -m pytest -q -m integration

lint: install ## ruff (lint and format check) and mypy (strict on schemas and detections)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy schemas detections collectors stream_jobs dashboards scopewatch

clean: down ## stop the stack and remove local state (.scopewatch) and the venv
	rm -rf .scopewatch $(VENV)
