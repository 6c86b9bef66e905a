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
