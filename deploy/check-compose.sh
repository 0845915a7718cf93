#!/usr/bin/env bash
# Checks deploy/compose.yaml without Docker:
# - it is YAML and validates against the Compose Specification JSON schema (the copy vendored in
#   check-jsonschema, from PyPI, installed into a throwaway virtualenv under $TMPDIR);
# - every PREAGG_* variable it sets, and every one the Dockerfile sets, is a configuration key of
#   the proxy (src/config.rs KEYS): an unknown variable is silently ignored by the binary;
# - every depends_on service has a healthcheck when the condition is service_healthy, and every
#   named volume used is declared;
# - every ${VAR} it reads is listed in deploy/.env.example.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

venv=${TMPDIR:-/tmp}/preagg-check-compose-venv
if [ ! -x "$venv/bin/check-jsonschema" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --disable-pip-version-check -q check-jsonschema pyyaml
fi

"$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml

"$venv/bin/python" - <<'EOF'
import re, sys, yaml

compose = yaml.safe_load(open("deploy/compose.yaml"))
config_rs = open("src/config.rs").read()
keys = {f"PREAGG_{k.upper()}" for k in re.findall(r'^    ([a-z0-9_]+): .+ = (?:None|Some\()', config_rs, re.M)}
if len(keys) < 10:
    sys.exit(f"check-compose: found only {len(keys)} keys in src/config.rs; has KEYS moved?")
problems = []

dockerfile = open("Dockerfile").read()
for name in re.findall(r"\b(PREAGG_[A-Z0-9_]+)=", dockerfile):
    if name not in keys:
        problems.append(f"Dockerfile sets {name}, which is no configuration key")

services = compose["services"]
declared_volumes = set((compose.get("volumes") or {}).keys())
for service_name, service in services.items():
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    for name in env:
        if name.startswith("PREAGG_") and name not in keys:
            problems.append(f"{service_name}: {name} is no configuration key")
    for dependency, spec in (service.get("depends_on") or {}).items():
        if dependency not in services:
            problems.append(f"{service_name}: depends on unknown service {dependency}")
        elif spec.get("condition") == "service_healthy" and "healthcheck" not in services[dependency]:
            problems.append(f"{service_name}: waits for {dependency} to be healthy, which has no healthcheck")
    for volume in service.get("volumes") or []:
        source = volume.split(":", 1)[0] if isinstance(volume, str) else volume.get("source", "")
        if source and not source.startswith((".", "/", "$")) and source not in declared_volumes:
            problems.append(f"{service_name}: volume {source} is not declared under volumes:")

text = open("deploy/compose.yaml").read()
used = set(re.findall(r"\$\{([A-Z0-9_]+)", text))
example = set(re.findall(r"^([A-Z0-9_]+)=", open("deploy/.env.example").read(), re.M))
for name in sorted(used - example):
    problems.append(f"${{{name}}} is read by compose.yaml but not listed in deploy/.env.example")

if problems:
    print("check-compose: FAILED", *problems, sep="\n  ", file=sys.stderr)
    sys.exit(1)
print(f"check-compose: OK ({len(services)} services; PREAGG_* variables are all among {len(keys)} keys)")
EOF
