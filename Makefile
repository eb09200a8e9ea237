.PHONY: install test lint bench

install:
	pip install torch==2.13.0
	pip install -e ".[dev]"

test:
	python -m pytest -q

lint:
	ruff check src tests benchmarks conversion
	ruff format --check src tests benchmarks conversion

bench:
	python benchmarks/bench_pipeline.py
