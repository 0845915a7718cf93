#!/usr/bin/env bash
# Dependency policy check: cargo-deny with deny.toml over Cargo.lock (licenses, bans, sources and
# RustSec advisories). Installs the pinned cargo-deny from crates.io when it is missing or another
# version (a few minutes on 2 cores, once per machine).
#
#     scripts/check-deny.sh
#
# The advisory database is a git repository on GitHub. Where GitHub cannot be reached (this
# project's own machines and CI reach only the package registries) the advisories check cannot run:
# - if an earlier fetch left a database in $CARGO_HOME/advisory-dbs, it is used as it is, and its
#   age is printed;
# - otherwise licenses, bans and sources are checked and a warning says that advisories were not;
#   set PREAGG_DENY_REQUIRE_ADVISORIES=1 (on a machine that has the network) to fail instead.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

version=0.20.2
cargo_home=${CARGO_HOME:-$HOME/.cargo}

installed=$(cargo deny --version 2>/dev/null || true)
if [ "$installed" != "cargo-deny $version" ]; then
    echo "check-deny: installing cargo-deny $version (found: ${installed:-none})" >&2
    cargo install cargo-deny --locked --version "$version"
fi

deny=(cargo deny --locked)
checks=(bans licenses sources)
advisories=skipped

if timeout 180 "${deny[@]}" fetch db >/dev/null 2>&1; then
    checks=(advisories "${checks[@]}")
    advisories=fresh
else
    # A database left by an earlier successful fetch (a clone with its crates/ tree).
    db=$(find "$cargo_home/advisory-dbs" -mindepth 2 -maxdepth 2 -type d -name crates 2>/dev/null | head -n 1)
    if [ -n "$db" ]; then
        db=$(dirname "$db")
        when=$(git -C "$db" log -1 --format=%cs 2>/dev/null || echo "unknown date")
        echo "check-deny: cannot fetch the advisory database; using the copy in $db (last change $when)" >&2
        deny+=(--offline)
        checks=(advisories "${checks[@]}")
        advisories=stale
    elif [ "${PREAGG_DENY_REQUIRE_ADVISORIES:-0}" = 1 ]; then
        echo "check-deny: the RustSec advisory database cannot be fetched (no access to GitHub) and PREAGG_DENY_REQUIRE_ADVISORIES=1" >&2
        exit 1
    fi
fi

# Duplicate-version warnings without their inclusion trees (cargo tree -d shows those).
"${deny[@]}" check --hide-inclusion-graph "${checks[@]}"

case $advisories in
    fresh) echo "check-deny: OK (advisories, bans, licenses, sources)" ;;
    stale) echo "check-deny: OK (advisories against a stale database; bans, licenses, sources)" ;;
    skipped)
        echo "check-deny: OK for bans, licenses, sources"
        echo "check-deny: WARNING: advisories NOT checked: the RustSec database (GitHub) cannot be fetched from here" >&2
        ;;
esac
