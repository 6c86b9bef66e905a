#!/usr/bin/env bash
# The main job: the demo run-matrix on the embedded tiny model and demo images, then its report.
# Resumes a previous run in runs/demo (finished cells are not recomputed).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
.venv/bin/qbench run-matrix configs/demo.toml --out runs/demo
.venv/bin/qbench report runs/demo --out runs/demo/report
echo "demo finished in $(( $(date +%s) - start )) s; report: runs/demo/report/report.md"
