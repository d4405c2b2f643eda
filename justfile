# kubelock's tasks. `scripts/dev RECIPE` runs one on a fresh machine.

set shell := ["bash", "-euo", "pipefail", "-c"]

# lint, types, the docs, and the whole suite against a real kube-apiserver (what CI runs)
test: lint docs test-tools
    uv run python -m kubelock.testing.assets
    uv run python -m kubelock.testing.toxiproxy
    uv run pytest

# ruff, mypy --strict and hadolint
lint:
    uv run ruff check
    uv run ruff format --check
    uv run mypy
    scripts/lint-dockerfile

# the documentation site (docs/, mkdocs.yml) into site/; any warning fails the build
docs:
    NO_MKDOCS_2_WARNING=1 uv run --frozen --group docs mkdocs build --strict

# a local control plane and three kubelocks racing for one lock, with a timeline
demo:
    uv run python scripts/demo.py

# the single-file executable users copy into their images: dist/kubelock
executable *ARGS:
    scripts/build-executable {{ARGS}}

# the container image kubelock:dev and the example app image (scripts/image --help)
image *ARGS:
    scripts/image {{ARGS}}

# end-to-end on a real cluster: E2E_CLUSTER=local (default: one node run here, as root), kind or minikube
e2e:
    #!/usr/bin/env bash
    set -euo pipefail
    # Everything slow happens before the tests' timeouts start: the runtime's
    # packages, the Kubernetes binaries (cached after the first build), the images.
    if [ "${E2E_CLUSTER:-local}" = local ]; then
        scripts/cluster-tools
        uv run python -m kubelock.testing.assets
        uv run python -m kubelock.testing.assets node
    fi
    scripts/image
    uv run pytest -m e2e tests/e2e

# the original's `make minikube`: namespace, images built inside minikube, the example applied
minikube:
    kubectl config use-context minikube
    kubectl delete namespace kubelock-example --ignore-not-found
    eval "$(minikube docker-env)" && docker build -t kubelock:dev . \
        && docker build --build-arg KUBELOCK_IMAGE=kubelock:dev -t kubelock-example-app:dev examples/init-container/app
    kubectl apply -k examples/init-container
    kubectl -n kubelock-example rollout status deployment/example-app --timeout=5m

# K contenders on one lock under seeded random faults (kills, freezes, control-plane restarts,
# network faults through Toxiproxy); fails on any overlap. ARGS: --seconds --handoffs --seed ...
chaos *ARGS:
    uv run python -m kubelock.testing.assets
    uv run python -m kubelock.testing.toxiproxy
    uv run python -m tests.chaos {{ARGS}}

# the deterministic simulator: contenders, a model API server, seeded faults; fails on any
# overlap of two commands. ARGS: --handoffs --per-seed --seed --trace --without --kind --timings
simulate *ARGS:
    uv run python -m tests.sim.simulate {{ARGS}}

# hand-off latency, a waiting contender's request rate, start-up cost, the watchdog's cost and speed
bench:
    uv run python -m benchmarks.handoff
    uv run python -m benchmarks.herd
    uv run python -m benchmarks.once
    uv run python -m benchmarks.startup
    uv run python -m benchmarks.safety

# what the suite needs besides Python packages and the Go-built control plane
test-tools:
    #!/usr/bin/env bash
    set -euo pipefail
    # The Pushgateway's Go module is not served by the module proxy here: Debian's build.
    if ! command -v prometheus-pushgateway >/dev/null && ! command -v pushgateway >/dev/null \
        && [ -z "${PUSHGATEWAY_BINARY:-}" ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus-pushgateway
        else
            echo "install prometheus-pushgateway, or set PUSHGATEWAY_BINARY to a pushgateway binary" >&2
            exit 1
        fi
    fi
    # Prometheus and promtool for deploy/monitoring's tests: Debian's build too.
    if { ! command -v prometheus >/dev/null && [ -z "${PROMETHEUS_BINARY:-}" ]; } \
        || { ! command -v promtool >/dev/null && [ -z "${PROMTOOL_BINARY:-}" ]; }; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus
        else
            echo "install prometheus (server and promtool), or set PROMETHEUS_BINARY and PROMTOOL_BINARY" >&2
            exit 1
        fi
    fi
    # tests/integration/test_django.py starts a PostgreSQL server of its own: Debian's.
    if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && [ -z "${POSTGRES_BINDIR:-}" ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql
        else
            echo "install postgresql, or set POSTGRES_BINDIR to the folder of initdb and pg_ctl" >&2
            exit 1
        fi
    fi
