#!/usr/bin/env bash
# The default test suite (about 10-15 min on 2 CPU cores). Extra args go to pytest.
source "$(dirname "$0")/env.sh"
python -m pytest -q "$@"
