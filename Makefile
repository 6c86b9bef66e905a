# The two commands a newcomer needs: `make demo` and `make test`. Each sets up .venv first.
.PHONY: setup demo test test-all lint bench

setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

test: setup
	bash scripts/test_tools.sh
	.venv/bin/python -m pytest -q -p no:cacheprovider

test-all: setup
	bash scripts/test_tools.sh
	.venv/bin/python -m pytest -q -p no:cacheprovider -m "slow or not slow"

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

# Benchmarks (docs/performance.md): each prints its figures and writes bench/results/NAME.json.
bench: setup
	for b in size resume_cost ray_scaling calibration_cost eval_speed; do OMP_NUM_THREADS=1 .venv/bin/python -m bench.$$b || exit 1; done
	@if [ -f runs/demo/config.resolved.json ]; then OMP_NUM_THREADS=1 .venv/bin/python -m bench.quality --run-dir runs/demo; else echo "bench.quality skipped: run make demo first"; fi
