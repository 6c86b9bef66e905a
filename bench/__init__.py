"""Benchmarks that print their figures and store them in ``bench/results/NAME.json``.

Each module runs as ``python -m bench.NAME`` from the repository root (``--help`` lists the options
that shrink the workload). Timings that are compared are ratios measured side by side in the same
run (interleaved repeats, median), because the development machine is shared and noisy; every
result file records the machine (CPU count, torch threads, load average before and after, date,
git commit). ``docs/performance.md`` quotes the figures with the command that produced them.
"""
