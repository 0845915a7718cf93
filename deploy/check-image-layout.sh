#!/usr/bin/env bash
# Checks the Dockerfile on a machine without a Docker engine: replays the builder stage (same
# `cargo build --release --locked`, from a build context filtered by .dockerignore), lays out a
# directory like the runtime image, and runs the proxy there as the image's user with the image's
# ENV against the project's test ClickHouse server: /healthz, /readyz, a query passing through, the
# SQLite store in the data directory, HEALTHCHECK, SIGTERM. Details: deploy/check_image_layout.py.
#
#     deploy/check-image-layout.sh [--keep] [--work DIR] [--tree DIR] [--dockerfile PATH]
#
# Run as root to run the proxy as the image's uid (setpriv); needs python3, readelf and the
# project's Python test environment (scripts/python-env.sh installs it). The first run compiles
# the release binary (several minutes on 2 cores); later runs reuse the target directory kept in
# $TMPDIR/preagg-image-check.
set -euo pipefail
exec python3 "$(dirname "${BASH_SOURCE[0]}")/check_image_layout.py" "$@"
