# Every target bootstraps .venv on its own (scripts/bootstrap.sh finds a Python >= 3.13).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bootstrapped

.PHONY: demo test bench lint chaos clean

$(STAMP): pyproject.toml scripts/bootstrap.sh
	@scripts/bootstrap.sh

demo: $(STAMP)
	$(VENV)/bin/tether demo

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/liveness.py
	$(PY) benchmarks/isolation_overhead.py
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/latency.py
	$(PY) benchmarks/scale.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .tether .pytest_cache

chaos: $(STAMP)
	$(PY) scripts/chaos.py --minutes 2
