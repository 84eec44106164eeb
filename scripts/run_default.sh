#!/usr/bin/env bash
# The main job on the embedded default: `dvc repro` of the whole pipeline (FP models are committed,
# everything downstream is rebuilt), then print the results table.
source "$(dirname "$0")/env.sh"
dvc repro "$@"
echo
cat results/results.md
