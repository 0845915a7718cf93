#!/usr/bin/env python3
"""Checks the Dockerfile without a Docker engine (run through deploy/check-image-layout.sh).

1. Reads the Dockerfile and the .dockerignore, and makes the build context Docker would send: only
   the files the .dockerignore lets through, with their modification times.
2. Replays the builder stage on this machine: WORKDIR, COPY (with `cp -p`, so copied sources are
   older than the dummy build, the worst case for the dummy-main layer) and RUN, each RUN in the
   stage's directory with the host's toolchain. RUN lines must use relative paths only, so nothing
   is written outside the check's directory. The build directory is kept between runs (like
   Docker's layer cache) except for target/, which stays warm; everything else is copied anew.
3. Checks the binary: it is the real one (`--version`), and it needs no shared library beyond
   glibc and libgcc at no newer glibc than Debian bookworm's 2.36.
4. Lays out a directory like the runtime stage, from its COPY, WORKDIR, USER and the RUN lines the
   check knows how to mirror (anything else in that stage fails the check until taught here).
5. Starts the project's test ClickHouse server (tests/chdb_server, with a user and password), then
   runs the stage's ENTRYPOINT from the WORKDIR as the stage's USER (setpriv, when run as root) with
   exactly the stage's ENV plus PREAGG_UPSTREAM and the ClickHouse credentials, as
   deploy/compose.yaml wires them, and expects: /healthz 200, /readyz 200, a query with the client's
   own credentials answered through the proxy and seen upstream, the SQLite store created in the
   data directory and nothing written anywhere else, the HEALTHCHECK command exiting 0, a clean exit
   on SIGTERM, and the HEALTHCHECK command exiting non-zero once the proxy is gone.

Options: --tree DIR (make the build context from DIR instead of this repository, e.g. an export of a
commit), --dockerfile PATH (another Dockerfile, e.g. to see a broken one fail), --work DIR (where
the replayed build and the layout go; default $TMPDIR/preagg-image-check), --keep (leave the
layout and logs behind).
"""

import argparse
import base64
import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOOKWORM_GLIBC = (2, 36)
ALLOWED_LIBS = {
    "libc.so.6", "libm.so.6", "libgcc_s.so.1", "libpthread.so.0", "libdl.so.2", "librt.so.1",
    "ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1", "libutil.so.1",
}
CLICKHOUSE_USER = "preagg"
CLICKHOUSE_PASSWORD = "layout-check-password"


class CheckFailed(Exception):
    pass


def step(message):
    print(f"check-image-layout: {message}", flush=True)


def fail(message):
    raise CheckFailed(message)


# --- Dockerfile -------------------------------------------------------------------------------

def parse_dockerfile(path):
    """Returns (global ARGs, stages); a stage is {name, base, instructions: [(KEYWORD, text)]}."""
    logical, current = [], ""
    with open(path, encoding="utf-8") as file:
        for raw in file:
            line = raw.rstrip("\n")
            stripped = line.strip()
            if not current and (not stripped or stripped.startswith("#")):
                continue
            if current and stripped.startswith("#"):
                continue  # comment lines inside a continuation are dropped, as Docker does
            if line.rstrip().endswith("\\"):
                current += line.rstrip()[:-1] + " "
                continue
            current += line
            logical.append(current.strip())
            current = ""
    if current.strip():
        logical.append(current.strip())
    args, stages = {}, []
    for text in logical:
        keyword, _, rest = text.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), words[0])
            stages.append({"name": name, "base": base, "instructions": []})
        elif not stages:
            if keyword == "ARG":
                key, _, value = rest.partition("=")
                args[key] = value
        else:
            stages[-1]["instructions"].append((keyword, rest))
    return args, stages


def parse_copy(text):
    flags, words = {}, shlex.split(text)
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        flags[key] = value
    if len(words) < 2:
        fail(f"COPY needs a source and a destination: COPY {text}")
    return flags, words[:-1], words[-1]


def parse_env(text):
    words = shlex.split(text)
    if words and "=" not in words[0]:
        return {words[0]: text.split(None, 1)[1] if len(words) > 1 else ""}
    env = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep:
            fail(f"ENV word without '=': {word}")
        env[key] = value
    return env


# --- Build context (.dockerignore) ------------------------------------------------------------

def read_dockerignore(path):
    patterns = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as file:
            for line in file:
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                negate = line.startswith("!")
                pattern = os.path.normpath(line[1:] if negate else line).lstrip("/")
                patterns.append((negate, pattern.split("/")))
    return patterns


def match_segments(pattern, parts):
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(match_segments(pattern[1:], parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and match_segments(pattern[1:], parts[1:])


def excluded(patterns, relpath):
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = relpath.split("/")
    result = False
    for negate, pattern in patterns:
        if any(match_segments(pattern, parts[:n]) for n in range(1, len(parts) + 1)):
            result = not negate
    return result


def make_context(tree, patterns, destination):
    if os.path.exists(destination):
        shutil.rmtree(destination)
    os.makedirs(destination)
    count = 0
    for directory, subdirs, files in os.walk(tree):
        reldir = os.path.relpath(directory, tree)
        reldir = "" if reldir == "." else reldir
        keep = []
        for sub in subdirs:
            rel = f"{reldir}/{sub}" if reldir else sub
            # A directory is walked if it is not excluded or if a negation could re-include below it.
            reincluded = any(negate and ("/".join(p) + "/").startswith(rel + "/") for negate, p in patterns)
            if reincluded or not excluded(patterns, rel):
                keep.append(sub)
        subdirs[:] = keep
        for name in files:
            rel = f"{reldir}/{name}" if reldir else name
            if not excluded(patterns, rel):
                target = os.path.join(destination, rel)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copy2(os.path.join(directory, name), target)
                count += 1
    return count


def docker_copy(sources_root, sources, destination, workdir):
    """COPY semantics for plain files and directories (a directory's contents are copied)."""
    if not destination.startswith("/"):
        destination = os.path.join(workdir, destination)
    many = len(sources) > 1 or destination.endswith("/")
    for source in sources:
        path = os.path.join(sources_root, source.lstrip("/"))
        if not os.path.exists(path):
            fail(f"COPY source {source} is not in the build context (missing, or left out by .dockerignore)")
        if os.path.isdir(path):
            shutil.copytree(path, destination, dirs_exist_ok=True, copy_function=shutil.copy2)
        else:
            target = os.path.join(destination, os.path.basename(source)) if many else destination
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy2(path, target)


# --- Builder stage ----------------------------------------------------------------------------

def replay_builder(stage, context, root):
    """Runs the builder stage under root/ (container paths are mapped below it)."""
    workdir = "/"
    os.makedirs(root, exist_ok=True)
    env = dict(os.environ)
    for key in ("CARGO_TARGET_DIR", "CARGO_BUILD_TARGET_DIR"):
        env.pop(key, None)
    for keyword, text in stage["instructions"]:
        if keyword == "WORKDIR":
            workdir = os.path.join(workdir, text)
            here = root + workdir
            os.makedirs(here, exist_ok=True)
            # A fresh layer stack each run, except the cargo target directory (warm like a cache).
            for entry in os.listdir(here):
                if entry != "target":
                    path = os.path.join(here, entry)
                    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        elif keyword == "COPY":
            flags, sources, destination = parse_copy(text)
            if flags:
                fail(f"builder COPY flags are not replayed: COPY {text}")
            target = destination if destination.startswith("/") else os.path.join(workdir, destination)
            docker_copy(context, sources, root + target, root + workdir)
        elif keyword == "RUN":
            if re.search(r"(^|[\s=>])/", text):
                fail(f"builder RUN uses an absolute path, which the replay cannot confine: RUN {text}")
            step(f"RUN {text}")
            result = subprocess.run(["bash", "-c", f"set -e; {text}"], cwd=root + workdir, env=env)
            if result.returncode != 0:
                fail(f"builder RUN exited {result.returncode}: {text}")
        elif keyword in ("ARG", "ENV", "LABEL"):
            if keyword == "ENV":
                env.update(parse_env(text))
        else:
            fail(f"builder instruction {keyword} is not replayed by this check")
    return root


def check_binary(binary):
    version = subprocess.run([binary, "--version"], capture_output=True, text=True)
    if version.returncode != 0 or not version.stdout.startswith("preagg-proxy "):
        fail(f"{binary} --version printed {version.stdout!r} (exit {version.returncode}): "
             "the dummy main of the dependency layer, not the project, ended up in the image")
    step(f"binary: {version.stdout.strip()}")
    dynamic = subprocess.run(["readelf", "-d", binary], capture_output=True, text=True, check=True).stdout
    needed = set(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic))
    extra = needed - ALLOWED_LIBS
    if extra:
        fail(f"the binary needs shared libraries debian:bookworm-slim does not have: {sorted(extra)}")
    versions = subprocess.run(["readelf", "-V", binary], capture_output=True, text=True, check=True).stdout
    glibc = max((tuple(int(x) for x in v.split(".")) for v in re.findall(r"GLIBC_(\d+\.\d+(?:\.\d+)?)", versions)),
                default=(0,))
    if glibc[:2] > BOOKWORM_GLIBC:
        fail(f"the binary needs glibc {'.'.join(map(str, glibc))}, newer than bookworm's 2.36")
    step(f"binary: needs {sorted(needed)}, glibc >= {'.'.join(map(str, glibc))} (bookworm has 2.36)")


# --- Runtime stage ----------------------------------------------------------------------------

def lay_out_runtime(stage, context, builder_root, root):
    """Mirrors the runtime stage under root/; returns its image configuration."""
    if os.path.exists(root):
        shutil.rmtree(root)
    os.makedirs(root)
    config = {"env": {}, "workdir": "/", "user": None, "expose": [], "healthcheck": None, "entrypoint": None,
              "uid": None, "writable": []}
    for keyword, text in stage["instructions"]:
        if keyword == "WORKDIR":
            config["workdir"] = os.path.join(config["workdir"], text)
            os.makedirs(root + config["workdir"], exist_ok=True)
        elif keyword == "COPY":
            flags, sources, destination = parse_copy(text)
            unknown = set(flags) - {"from"}
            if unknown:
                fail(f"runtime COPY flags not mirrored: {sorted(unknown)}")
            if flags.get("from") and flags["from"] != "builder":
                fail(f"COPY --from={flags['from']} is not mirrored")
            source_root = builder_root if flags.get("from") else context
            destination = destination if destination.startswith("/") else os.path.join(config["workdir"], destination)
            target = root + destination
            docker_copy(source_root, sources, target + ("/" if destination.endswith("/") else ""), root + config["workdir"])
        elif keyword == "RUN":
            mirror_run(text, root, config)
        elif keyword == "ENV":
            config["env"].update(parse_env(text))
        elif keyword == "USER":
            config["user"] = text
        elif keyword == "EXPOSE":
            config["expose"] += [int(p.split("/")[0]) for p in text.split()]
        elif keyword == "HEALTHCHECK":
            match = re.search(r"\bCMD\s+(\[.*\])\s*$", text)
            if not match:
                fail(f"HEALTHCHECK is not in exec form: {text}")
            config["healthcheck"] = json.loads(match.group(1))
        elif keyword == "ENTRYPOINT":
            config["entrypoint"] = json.loads(text)
        elif keyword in ("LABEL", "ARG", "STOPSIGNAL"):
            pass
        else:
            fail(f"runtime instruction {keyword} is not mirrored by this check")
    return config


def mirror_run(text, root, config):
    commands = [c.strip() for c in text.split("&&")]
    for command in commands:
        words = shlex.split(command)
        if not words:
            continue
        if words[0] in ("apt-get", "rm") and ("/var/lib/apt/lists/*" in words or words[0] == "apt-get"):
            if words[0] == "apt-get" and "install" in words:
                packages = [w for w in words[words.index("install") + 1:] if not w.startswith("-")]
                if packages != ["ca-certificates"]:
                    fail(f"the runtime stage installs {packages}; this check mirrors ca-certificates only")
            continue  # packages: not mirrored (the binary's own library needs are checked with readelf)
        if words[0] in ("groupadd", "useradd"):
            if words[0] == "useradd":
                uid = words[words.index("--uid") + 1]
                gid = words[words.index("--gid") + 1]
                config["uid"] = (int(uid), int(gid))
            continue
        if words[0] == "install" and "-d" in words:
            owner, group, mode = (words[words.index(f) + 1] for f in ("-o", "-g", "-m"))
            path = root + words[-1]
            os.makedirs(path, exist_ok=True)
            if os.geteuid() == 0:
                os.chown(path, int(owner), int(group))
            os.chmod(path, int(mode, 8))
            config["writable"].append(words[-1])
            continue
        fail(f"runtime RUN command not mirrored by this check (teach deploy/check_image_layout.py): {command}")


# --- Running it -------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port):
    for host in ("0.0.0.0", "127.0.0.1"):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def http(method, url, body=None, headers=None, timeout=10):
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode("utf-8", "replace")
    except (urllib.error.URLError, ConnectionError, socket.timeout) as error:
        return None, str(error)


def wait_for(what, probe, timeout):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        ok, last = probe()
        if ok:
            return last
        time.sleep(0.25)
    fail(f"{what}: not within {timeout}s (last: {last})")


def snapshot(root, skip):
    files = {}
    for directory, _, names in os.walk(root):
        if any(directory == s or directory.startswith(s + "/") for s in skip):
            continue
        for name in names + [""]:
            path = os.path.join(directory, name)
            stat = os.lstat(path)
            files[path] = (stat.st_mtime_ns, stat.st_size, stat.st_mode)
    return files


def run_image(config, root, work, keep):
    uid, gid = (int(x) for x in config["user"].split(":")) if config["user"] else (0, 0)
    if config["uid"] and config["uid"] != (uid, gid):
        fail(f"USER {config['user']} is not the user created in the image {config['uid']}")
    if uid == 0:
        fail("the runtime stage runs as root")
    env_image = dict(config["env"])
    listen = env_image.get("PREAGG_LISTEN", "")
    admin = env_image.get("PREAGG_ADMIN_LISTEN", "")
    for key, value in (("PREAGG_LISTEN", listen), ("PREAGG_ADMIN_LISTEN", admin)):
        if not value.startswith("0.0.0.0:"):
            fail(f"{key}={value!r}: a container must listen on all of its interfaces")
    ports = [int(listen.rsplit(":", 1)[1]), int(admin.rsplit(":", 1)[1])]
    if sorted(ports) != sorted(config["expose"]):
        fail(f"EXPOSE {config['expose']} differs from the listen ports {ports}")
    if not config["healthcheck"] or not config["entrypoint"]:
        fail("HEALTHCHECK and ENTRYPOINT (exec form) are required")
    if config["entrypoint"][:2] != ["preagg-proxy", "serve"]:
        fail(f"ENTRYPOINT {config['entrypoint']} is not preagg-proxy serve")

    if not all(port_free(p) for p in ports):
        ports = [free_port(), free_port()]
        env_image["PREAGG_LISTEN"], env_image["PREAGG_ADMIN_LISTEN"] = (f"0.0.0.0:{p}" for p in ports)
        step(f"8124/8125 are taken on this machine; the check listens on {ports} instead")
    proxy_port, admin_port = ports

    # The test ClickHouse server, with a password as deploy/compose.yaml has one.
    python = subprocess.run([os.path.join(REPO, "scripts", "python-env.sh")], capture_output=True, text=True)
    if python.returncode != 0:
        fail(f"scripts/python-env.sh failed: {python.stderr}")
    port_file = os.path.join(work, "clickhouse.port")
    request_log = os.path.join(work, "clickhouse-requests.jsonl")
    for path in (port_file, request_log):
        if os.path.exists(path):
            os.remove(path)
    ch_log = open(os.path.join(work, "clickhouse.log"), "w")
    processes = []
    clickhouse = subprocess.Popen(
        [python.stdout.strip(), os.path.join(REPO, "tests", "chdb_server", "server.py"),
         "--data-dir", os.path.join(work, "clickhouse-data"), "--port-file", port_file,
         "--request-log", request_log, "--auth", f"{CLICKHOUSE_USER}:{CLICKHOUSE_PASSWORD}"],
        stdout=ch_log, stderr=subprocess.STDOUT, start_new_session=True)
    processes.append(clickhouse)
    proxy = None
    proxy_log_path = os.path.join(work, "proxy.log")
    try:
        wait_for("the test ClickHouse server to listen",
                 lambda: (os.path.exists(port_file) or clickhouse.poll() is not None, None), 120)
        if clickhouse.poll() is not None:
            fail(f"the test ClickHouse server exited {clickhouse.returncode}; see {ch_log.name}")
        ch_port = int(open(port_file).read())
        step(f"test ClickHouse server on 127.0.0.1:{ch_port} (user {CLICKHOUSE_USER}, with password)")

        env = {
            "PATH": f"{root}/usr/local/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/nonexistent",
            "HOSTNAME": "preagg-proxy",
        }
        env.update(env_image)
        env.update({
            "PREAGG_UPSTREAM": f"http://127.0.0.1:{ch_port}",
            "PREAGG_CLICKHOUSE_USER": CLICKHOUSE_USER,
            "PREAGG_CLICKHOUSE_PASSWORD": CLICKHOUSE_PASSWORD,
        })
        step(f"image ENV {env_image}; plus PREAGG_UPSTREAM, PREAGG_CLICKHOUSE_USER/PASSWORD as compose sets them")
        if os.geteuid() == 0:
            if not shutil.which("setpriv"):
                fail("setpriv (util-linux) is needed to run the proxy as the image's user")
            as_user = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--no-new-privs", "--"]
            step(f"running as uid {uid} gid {gid} with setpriv, from {config['workdir']}")
        else:
            as_user = []
            step(f"not root: running as the current user (uid {os.geteuid()}) instead of {uid}")
        # The directory above the layout must be enterable by that user.
        for path in (work, root):
            os.chmod(path, 0o755)
        cwd = root + config["workdir"]
        before = snapshot(root, [root + w for w in config["writable"]])
        proxy_log = open(proxy_log_path, "w")
        proxy = subprocess.Popen(as_user + config["entrypoint"], cwd=cwd, env=env, stdout=proxy_log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        processes.append(proxy)
        base, admin_base = f"http://127.0.0.1:{proxy_port}", f"http://127.0.0.1:{admin_port}"

        def alive(probe):
            def wrapped():
                if proxy.poll() is not None:
                    fail(f"the proxy exited {proxy.returncode}:\n{open(proxy_log_path).read()[-3000:]}")
                return probe()
            return wrapped

        body = wait_for("GET /healthz = 200", alive(lambda: (lambda r: (r[0] == 200, r))(http("GET", admin_base + "/healthz"))), 30)
        step(f"GET /healthz -> 200 {body[1].strip()!r}")
        body = wait_for("GET /readyz = 200", alive(lambda: (lambda r: (r[0] == 200, r))(http("GET", admin_base + "/readyz"))), 90)
        step(f"GET /readyz -> 200 {body[1].strip()!r}")

        marker = f"image-layout-check-{uuid.uuid4().hex[:12]}"
        auth = "Basic " + base64.b64encode(f"{CLICKHOUSE_USER}:{CLICKHOUSE_PASSWORD}".encode()).decode()
        status, text = http("POST", base + "/", f"SELECT '{marker}' AS marker, 1 + 1 AS two FORMAT TabSeparated".encode(),
                            {"Authorization": auth})
        if status != 200 or text.strip() != f"{marker}\t2":
            fail(f"query through the proxy: {status} {text!r}")
        step(f"POST / (client's own Basic credentials) -> 200 {text.strip()!r}")
        status, text = http("GET", base + "/?query=SELECT%201", headers={"Authorization": "Basic " + base64.b64encode(b"preagg:wrong").decode()})
        if status == 200:
            fail("a query with a wrong password was answered: the client's credentials are not what reaches ClickHouse")
        step(f"GET /?query=SELECT 1 with a wrong password -> {status} (the client's credentials reach ClickHouse)")
        seen = open(request_log).read() if os.path.exists(request_log) else ""
        if marker not in seen:
            fail("the query answered through the proxy is not in the upstream's request log")
        step("the query is in the upstream's request log")

        data_dir = root + config["writable"][0] if config["writable"] else None
        store = env_image.get("PREAGG_STORE", "")
        if store.startswith("sqlite://"):
            db = os.path.normpath(os.path.join(cwd, store[len("sqlite://"):].split("?")[0]))
            if not os.path.exists(db):
                fail(f"the SQLite store {db} was not created")
            if data_dir and not db.startswith(data_dir + "/"):
                fail(f"the SQLite store {db} is not in the writable directory {data_dir}")
            owner = os.stat(db).st_uid
            if os.geteuid() == 0 and owner != uid:
                fail(f"the SQLite store is owned by uid {owner}, not {uid}")
            step(f"SQLite store created: {os.path.relpath(db, root)} (uid {owner}); "
                 f"data dir holds {sorted(os.listdir(data_dir))}")
        after = snapshot(root, [root + w for w in config["writable"]])
        changed = sorted(set(after) ^ set(before) | {p for p in after if p in before and after[p] != before[p]})
        if changed:
            fail(f"the proxy wrote outside its data directory: {changed}")
        step("nothing written outside " + ", ".join(config["writable"]))

        health = [root + c if c.startswith("/") else c for c in config["healthcheck"]]
        result = subprocess.run(as_user + health, env=env, cwd=cwd, capture_output=True, text=True, timeout=10)
        if result.returncode != 0:
            fail(f"HEALTHCHECK {config['healthcheck']} exited {result.returncode}: {result.stderr}")
        step(f"HEALTHCHECK {config['healthcheck']} -> exit 0")

        started = time.monotonic()
        proxy.send_signal(signal.SIGTERM)
        try:
            code = proxy.wait(timeout=35)
        except subprocess.TimeoutExpired:
            fail("the proxy did not exit within 35s of SIGTERM")
        if code != 0:
            fail(f"the proxy exited {code} on SIGTERM:\n{open(proxy_log_path).read()[-3000:]}")
        step(f"SIGTERM -> exit 0 after {time.monotonic() - started:.1f}s")
        result = subprocess.run(as_user + health, env=env, cwd=cwd, capture_output=True, text=True, timeout=10)
        if result.returncode == 0:
            fail("HEALTHCHECK still passes with the proxy stopped")
        step(f"HEALTHCHECK with the proxy stopped -> exit {result.returncode} ({result.stderr.strip()})")
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        ch_log.close()
        if keep:
            step(f"kept: layout {root}, logs {proxy_log_path}, {ch_log.name}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", default=REPO, help="directory the build context is made from (default: this repository)")
    parser.add_argument("--dockerfile", help="default: Dockerfile in the tree")
    parser.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "preagg-image-check"))
    parser.add_argument("--keep", action="store_true")
    options = parser.parse_args()
    work = os.path.abspath(options.work)
    os.makedirs(work, exist_ok=True)
    try:
        tree = os.path.abspath(options.tree)
        args, stages = parse_dockerfile(options.dockerfile or os.path.join(tree, "Dockerfile"))
        if len(stages) != 2 or stages[0]["name"] != "builder":
            fail(f"expected two stages, `builder` then the runtime; found {[s['name'] for s in stages]}")
        builder, runtime = stages
        step(f"stages: builder FROM {builder['base']}, runtime FROM {runtime['base']}")
        if not re.fullmatch(r"rust:[\d.]+-bookworm", builder["base"]) or runtime["base"] != "debian:bookworm-slim":
            fail("expected rust:<version>-bookworm and debian:bookworm-slim (same glibc)")
        os_release = open("/etc/os-release").read() if os.path.exists("/etc/os-release") else ""
        if 'VERSION_CODENAME=bookworm' not in os_release:
            step("warning: this machine is not Debian bookworm; the replayed build links against its own glibc")

        patterns = read_dockerignore(os.path.join(tree, ".dockerignore"))
        context = os.path.join(work, "context")
        count = make_context(tree, patterns, context)
        step(f"build context: {count} files pass .dockerignore")

        builder_root = replay_builder(builder, context, os.path.join(work, "builder"))
        binary = os.path.join(builder_root, "build", "target", "release", "preagg-proxy")
        check_binary(binary)

        root = os.path.join(work, "image")
        config = lay_out_runtime(runtime, context, builder_root, root)
        for path in ("usr/local/bin/preagg-proxy", "app/rules"):
            if not os.path.exists(os.path.join(root, path)):
                fail(f"/{path} is missing from the layout")
        rules = [n for n in os.listdir(os.path.join(root, "app", "rules")) if n.endswith(".toml")]
        step(f"layout: {root} (rules: {rules}, writable: {config['writable']}, USER {config['user']})")
        run_image(config, root, work, options.keep)
    except CheckFailed as error:
        print(f"check-image-layout: FAILED: {error}", file=sys.stderr, flush=True)
        return 1
    step("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
