#!/usr/bin/env python3
"""Checks docker-compose.yml and docker/Dockerfile against the real binaries, with no Docker
engine: the one thing a schema check cannot prove is that what Compose would start actually
starts, so this starts it.

Usage: check_deploy.py REPO BIN_DIR   (BIN_DIR holds the built `p2pchat-discovery`, `p2pchat`)

1. Static: every service's build target is a Dockerfile stage; every binary the images copy
   out of the builder is a binary of the workspace; every file copied from the build context
   exists and is not excluded by .dockerignore; the defaults written into `command:` as
   `--flag=${VAR:-default}` are the binary's own defaults.
2. Redis access: Compose refuses to resolve the file without REDIS_PASSWORD (there is no
   default password); with one set, redis is started with `--requirepass` and exactly that
   password, and discovery's REDIS_URL carries it; redis is only on internal networks; the
   client service shares no network with redis, and discovery shares one with each.
   docker-compose.cluster.yml likewise: it too demands REDIS_PASSWORD; its six Redis nodes
   run in cluster mode with `--requirepass` and `--masterauth`, on internal networks only,
   none shared with the client; every URL in discovery's REDIS_URL names a node and carries
   the password; its discovery and client services equal docker-compose.yml's but for
   REDIS_URL, P2PCHAT_REDIS_REPLICAS (a flag the binary has) and `depends_on`. (Its stack
   is not started here: the store and end-to-end tests run real clusters.)
3. Live: the stack as `docker compose config` resolves it (no variables set but a fresh
   random REDIS_PASSWORD, so the defaults) is started as local processes: each runtime
   stage's ENV, WORKDIR, ENTRYPOINT (through the real tini) and the service's environment
   and command. Container paths (volumes, WORKDIR) become temporary folders; container ports
   and the host names of services on a shared network become free loopback ports (a host
   name of a service on no shared network is a finding: Docker would not resolve it); files
   the Dockerfile copies into /usr/local/bin are found on PATH. Then: redis (its `command:`)
   comes up and passes its healthcheck, and refuses a client without the password
   (NOAUTH); discovery given no password or a wrong one in REDIS_URL stops at start saying
   so, without printing the password; discovery as configured comes up and passes
   its healthchecks (which first must fail while nothing listens); every port the discovery
   service publishes answers; two clients started as `docker compose run client --user
   NAME ...` chat; the documented `docker compose exec discovery p2pchat-discovery announce`
   reaches them; SIGTERM stops discovery and a client with exit status 0 within the
   service's stop_grace_period.

Exits 1 with every finding printed.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml

COMPOSE_FILE = "docker-compose.yml"
# The variable that holds Redis's password; the file must demand it (no default).
PASSWORD_VARIABLE = "REDIS_PASSWORD"
WILDCARD_HOSTS = {"0.0.0.0", "::", "[::]"}
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
STARTUP_TIMEOUT = 20.0

findings: list[str] = []


def finding(message: str) -> None:
    findings.append(message)
    print(f"  FAIL {message}", flush=True)


def ok(message: str) -> None:
    print(f"  ok   {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# Dockerfile


@dataclass
class Stage:
    """One `FROM ... AS name` stage, with what the runtime checks need."""

    name: str
    base: str
    env: dict[str, str] = field(default_factory=dict)
    workdir: str | None = None
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    healthcheck: list[str] | None = None
    user: str | None = None
    # (source, destination, --from stage or None for the build context)
    copies: list[tuple[str, str, str | None]] = field(default_factory=list)


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def exec_form(arguments: str) -> list[str]:
    """The JSON (exec) form of ENTRYPOINT/CMD, or a shell form wrapped as Docker does."""
    if arguments.startswith("["):
        return json.loads(arguments)
    return ["/bin/sh", "-c", arguments]


def parse_dockerfile(path: Path) -> dict[str, Stage]:
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    for keyword, rest in dockerfile_instructions(path.read_text()):
        if keyword == "ARG" and stage is None:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            words = rest.split()
            words = [word for word in words if not word.startswith("--")]
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), words[0])
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else base
            stage = Stage(name=name, base=base)
            stages[name] = stage
        elif stage is None:
            continue
        elif keyword == "ENV":
            for word in shlex.split(rest):
                key, _, value = word.partition("=")
                stage.env[key] = value
        elif keyword == "WORKDIR":
            stage.workdir = rest
        elif keyword == "ENTRYPOINT":
            stage.entrypoint = exec_form(rest)
        elif keyword == "CMD":
            stage.cmd = exec_form(rest)
        elif keyword == "USER":
            stage.user = rest
        elif keyword == "HEALTHCHECK":
            _options, _, command = rest.partition("CMD")
            stage.healthcheck = exec_form(command.strip()) if command else None
        elif keyword == "COPY":
            words = rest.split()
            source_stage = None
            for word in [word for word in words if word.startswith("--")]:
                if word.startswith("--from="):
                    source_stage = word.split("=", 1)[1]
            paths = [word for word in words if not word.startswith("--")]
            for source in paths[:-1]:
                stage.copies.append((source, paths[-1], source_stage))
    return stages


def stage_chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and the stages it is built FROM, base first."""
    chain = []
    while name in stages:
        chain.insert(0, stages[name])
        name = stages[name].base
    return chain


@dataclass
class Image:
    """What a container of one runtime stage starts with."""

    env: dict[str, str]
    workdir: str
    entrypoint: list[str]
    cmd: list[str]
    healthcheck: list[str] | None
    user: str
    # container path → (source, --from stage or None)
    files: dict[str, tuple[str, str | None]]


def image_of(stages: dict[str, Stage], name: str) -> Image:
    image = Image(
        env={}, workdir="/", entrypoint=[], cmd=[], healthcheck=None, user="root", files={}
    )
    for stage in stage_chain(stages, name):
        image.env.update(stage.env)
        if stage.workdir:
            image.workdir = stage.workdir
        if stage.entrypoint is not None:
            image.entrypoint = stage.entrypoint
            image.cmd = []
        if stage.cmd is not None:
            image.cmd = stage.cmd
        if stage.healthcheck is not None:
            image.healthcheck = stage.healthcheck
        if stage.user is not None:
            image.user = stage.user
        for source, destination, source_stage in stage.copies:
            target = destination
            if destination.endswith("/"):
                target = destination + Path(source).name
            image.files[target] = (source, source_stage)
    return image


# ---------------------------------------------------------------------------------------------
# .dockerignore


def dockerignore_regex(pattern: str) -> str:
    """A .dockerignore pattern as a regex over slash-separated paths (`**` spans folders)."""
    regex = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            regex += ".*"
            i += 2
        elif pattern[i] == "*":
            regex += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            regex += "[^/]"
            i += 1
        else:
            regex += re.escape(pattern[i])
            i += 1
    return regex


def dockerignored(repo: Path, relative: str) -> bool:
    """Whether .dockerignore keeps `relative` out of the build context (last match wins; a
    pattern that matches a parent folder excludes what is inside it)."""
    path = repo / ".dockerignore"
    if not path.exists():
        return False
    parts = Path(relative).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for line in path.read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        regex = dockerignore_regex(pattern.lstrip("!").strip().strip("/"))
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            excluded = not negate
    return excluded


# ---------------------------------------------------------------------------------------------
# Static checks


def workspace_binaries(repo: Path) -> set[str]:
    output = subprocess.run(
        ["cargo", "metadata", "--no-deps", "--format-version", "1", "--locked"],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return {
        target["name"]
        for package in json.loads(output)["packages"]
        for target in package["targets"]
        if "bin" in target["kind"]
    }


def help_defaults(binary: Path) -> dict[str, str]:
    """`--flag` → its `[default: …]` as the binary's own `--help` prints it."""
    text = subprocess.run(
        [str(binary), "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": os.environ["PATH"]},
    ).stdout
    defaults = {}
    # One block per option: its `--name` line and the indented lines under it.
    for block in re.split(r"\n(?=\s{0,6}(?:-\w, )?--)", text):
        name = re.match(r"\s*(?:-\w, )?--([a-z0-9-]+)", block)
        default = re.search(r"\[default: ([^\]]*)\]", block)
        if name and default:
            defaults[name.group(1)] = default.group(1)
    return defaults


def static_checks(repo: Path, bin_dir: Path, raw: dict, stages: dict[str, Stage]) -> None:
    binaries = workspace_binaries(repo)
    for name, stage in stages.items():
        for source, _destination, source_stage in stage.copies:
            if source_stage is None:
                if not (repo / source).exists() and source != ".":
                    finding(f"Dockerfile stage {name}: COPY source {source} does not exist")
                elif source != "." and dockerignored(repo, source):
                    finding(f"Dockerfile stage {name}: {source} is excluded by .dockerignore")
            elif source_stage in stages and source.startswith("/out/"):
                if Path(source).name not in binaries:
                    finding(
                        f"Dockerfile stage {name}: copies {source}, not a binary of the "
                        f"workspace ({', '.join(sorted(binaries))})"
                    )
    for service_name, service in raw["services"].items():
        build = service.get("build")
        if build is None:
            continue
        dockerfile = repo / build.get("context", ".") / build.get("dockerfile", "Dockerfile")
        if not dockerfile.exists():
            finding(f"service {service_name}: {dockerfile} does not exist")
        target = build.get("target")
        if target not in stages:
            finding(f"service {service_name}: build target {target!r} is no Dockerfile stage")
            continue
        image = image_of(stages, target)
        if image.user.split(":")[0] in ("root", "0"):
            finding(f"service {service_name}: stage {target} runs as root (no USER)")
        program = program_of(image.entrypoint + image.cmd)
        if program is None or program not in binaries:
            finding(f"service {service_name}: entrypoint {image.entrypoint} runs no binary")
            continue
        if f"/usr/local/bin/{program}" not in image.files:
            finding(f"service {service_name}: {program} is not copied into stage {target}")
        defaults = help_defaults(bin_dir / program)
        for argument in service.get("command") or []:
            match = re.fullmatch(r"--([a-z0-9-]+)=\$\{\w+:-([^}]*)\}", str(argument))
            if not match:
                continue
            flag, written = match.groups()
            if flag not in defaults:
                finding(f"service {service_name}: {program} has no default for --{flag}")
            elif defaults[flag] != written:
                finding(
                    f"service {service_name}: --{flag} defaults to {written} here but "
                    f"{defaults[flag]} in {program}"
                )
            else:
                ok(f"{service_name}: --{flag} default {written} is the binary's")
    if not findings:
        ok("build targets, copied binaries and files, .dockerignore")


def program_of(argv: list[str]) -> str | None:
    """The program an entrypoint runs, looking through `tini --`."""
    if argv[:2] == ["tini", "--"]:
        argv = argv[2:]
    return argv[0] if argv else None


# ---------------------------------------------------------------------------------------------
# Redis access


def networks_of(service: dict) -> set[str]:
    """The networks a resolved service is attached to (`default` when it names none)."""
    networks = service.get("networks")
    if not networks:
        return {"default"}
    return set(networks)


def requirepass_of(service: dict) -> str | None:
    """The value after `--requirepass` in a service's command, if there is one."""
    command = [str(word) for word in service.get("command") or []]
    for flag, value in zip(command, command[1:]):
        if flag == "--requirepass":
            return value
    return None


def redis_access_checks(
    unresolved: subprocess.CompletedProcess, resolved: dict, password: str
) -> None:
    """Only discovery can reach Redis, and only with the password the operator set."""
    if unresolved.returncode == 0:
        finding(
            f"docker-compose config succeeds without {PASSWORD_VARIABLE}: the file must "
            f"demand it (${{{PASSWORD_VARIABLE}:?...}}), not fall back to a default"
        )
    elif PASSWORD_VARIABLE not in unresolved.stderr:
        finding(
            f"docker-compose config fails without {PASSWORD_VARIABLE}, but for another "
            f"reason:\n{indent(unresolved.stderr)}"
        )
    else:
        ok(f"Compose refuses to start without {PASSWORD_VARIABLE} (no default password)")

    services = resolved["services"]
    redis, discovery = services["redis"], services["discovery"]
    required = requirepass_of(redis)
    if required is None:
        finding("redis: no --requirepass in its command; any client can use it")
    elif required != password:
        finding(f"redis: --requirepass is not the value of {PASSWORD_VARIABLE}")
    else:
        ok(f"redis requires the password from {PASSWORD_VARIABLE} (--requirepass)")
    url = str((discovery.get("environment") or {}).get("REDIS_URL", ""))
    parts = urlsplit(url)
    if parts.hostname != "redis" or unquote(parts.password or "") != password:
        finding(
            f"discovery: REDIS_URL must be redis://:${{{PASSWORD_VARIABLE}}}@redis:PORT "
            f"(the password from {PASSWORD_VARIABLE}, host redis)"
        )
    else:
        ok(f"discovery's REDIS_URL carries the password from {PASSWORD_VARIABLE}")

    networks = resolved.get("networks") or {}
    redis_networks = networks_of(redis)
    for name in sorted(redis_networks):
        if not (networks.get(name) or {}).get("internal"):
            finding(f"redis is on network {name}, which is not `internal: true`")
    shared = networks_of(services["client"]) & redis_networks
    if shared:
        finding(f"client shares network(s) {sorted(shared)} with redis: a client reaches Redis")
    else:
        ok(f"client shares no network with redis ({sorted(redis_networks)}, internal)")
    for other in ("redis", "client"):
        if not networks_of(discovery) & networks_of(services[other]):
            finding(f"discovery shares no network with {other}")


# ---------------------------------------------------------------------------------------------
# The Redis Cluster file

CLUSTER_FILE = "docker-compose.cluster.yml"
# What the cluster file's discovery service may change from the single-Redis file's.
CLUSTER_ONLY_ENVIRONMENT = {"REDIS_URL", "P2PCHAT_REDIS_REPLICAS"}


def cluster_checks(repo: Path, bin_dir: Path, main_resolved: dict, password: str) -> None:
    """The cluster file: Redis demands the password and only discovery reaches it, as in
    the single-Redis file; REDIS_URL names cluster nodes with the password; and its
    discovery and client services are the single-Redis file's but for what a cluster
    changes (they are repeated there, since Compose cannot `extends` a service with
    `depends_on`)."""
    unresolved = compose_config(repo, {}, CLUSTER_FILE)
    if unresolved.returncode == 0:
        finding(f"{CLUSTER_FILE}: resolves without {PASSWORD_VARIABLE}; it must demand it")
    result = compose_config(repo, {PASSWORD_VARIABLE: password}, CLUSTER_FILE)
    if result.returncode != 0:
        finding(f"{CLUSTER_FILE}: docker-compose config failed:\n{indent(result.stderr)}")
        return
    resolved = yaml.safe_load(result.stdout)
    services = resolved["services"]
    networks = resolved.get("networks") or {}
    nodes = {
        name: service
        for name, service in services.items()
        if str(service.get("image", "")).startswith("redis") and name != "redis-cluster-init"
    }
    if len(nodes) < 6:
        finding(f"{CLUSTER_FILE}: {len(nodes)} Redis nodes; 3 masters with a replica each need 6")
    client_networks = networks_of(services["client"])
    for name, node in sorted(nodes.items()):
        command = " ".join(str(word) for word in node.get("command") or [])
        auth = (node.get("environment") or {}).get("REDISCLI_AUTH")
        for flag in ("--cluster-enabled yes", "--requirepass", "--masterauth"):
            if flag not in command:
                finding(f"{CLUSTER_FILE}: {name} runs without {flag}")
        if auth != password:
            finding(f"{CLUSTER_FILE}: {name}'s REDISCLI_AUTH is not {PASSWORD_VARIABLE}")
        for network in sorted(networks_of(node)):
            if not (networks.get(network) or {}).get("internal"):
                finding(f"{CLUSTER_FILE}: {name} is on network {network}, not internal")
        if networks_of(node) & client_networks:
            finding(f"{CLUSTER_FILE}: the client shares a network with {name}")
    discovery = services["discovery"]
    environment = discovery.get("environment") or {}
    urls = str(environment.get("REDIS_URL", "")).split(",")
    for url in urls:
        parts = urlsplit(url.strip())
        if parts.hostname not in nodes or unquote(parts.password or "") != password:
            finding(
                f"{CLUSTER_FILE}: discovery's REDIS_URL entry {parts.hostname!r} is not a "
                f"Redis node with the password from {PASSWORD_VARIABLE}"
            )
    usage = subprocess.run(
        [str(bin_dir / "p2pchat-discovery"), "--help"],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"]},
    ).stdout
    if "P2PCHAT_REDIS_REPLICAS" in environment and "--redis-replicas" not in usage:
        finding("p2pchat-discovery has no --redis-replicas for P2PCHAT_REDIS_REPLICAS")
    main_services = main_resolved["services"]
    for name in ("discovery", "client"):
        ours = {key: value for key, value in services[name].items() if key != "depends_on"}
        theirs = {
            key: value for key, value in main_services[name].items() if key != "depends_on"
        }
        if name == "discovery":
            for side in (ours, theirs):
                side["environment"] = {
                    key: value
                    for key, value in (side.get("environment") or {}).items()
                    if key not in CLUSTER_ONLY_ENVIRONMENT
                }
        if ours != theirs:
            changed = sorted(
                key for key in set(ours) | set(theirs) if ours.get(key) != theirs.get(key)
            )
            finding(
                f"{CLUSTER_FILE}: service {name} differs from {COMPOSE_FILE}'s in {changed}"
            )
    if not findings:
        ok(
            f"{CLUSTER_FILE}: {len(nodes)} nodes demanding the password on an internal "
            "network, REDIS_URL names them, discovery and client as in the single-Redis file"
        )


# ---------------------------------------------------------------------------------------------
# Live checks


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Sandbox:
    """Maps container paths and addresses of the resolved Compose file onto this machine."""

    def __init__(self, root: Path, services: dict) -> None:
        self.root = root
        self.services = services
        self.ports: dict[tuple[str, int], int] = {}

    def port(self, service: str, container_port: int) -> int:
        key = (service, container_port)
        if key not in self.ports:
            self.ports[key] = free_port()
        return self.ports[key]

    def folder(self, service: str, container_path: str) -> Path:
        path = self.root / service / container_path.strip("/").replace("/", "_")
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o700)
        return path

    def rewrite(self, service: str, value: str, mounts: list[str]) -> str:
        """A value as the process sees it here: container folders → temporary folders,
        `host:port` of a wildcard, the loopback or another service → a loopback port."""

        def address(match: re.Match) -> str:
            host, port = match.group("host"), int(match.group("port"))
            if host in WILDCARD_HOSTS or host in LOCAL_HOSTS:
                return f"127.0.0.1:{self.port(service, port)}"
            if host in self.services:
                if not networks_of(self.services[service]) & networks_of(self.services[host]):
                    finding(
                        f"{service} names {host}:{port}, but shares no network with {host}: "
                        "Docker would not resolve that name"
                    )
                return f"127.0.0.1:{self.port(host, port)}"
            return match.group(0)

        value = re.sub(
            r"(?P<host>\[[0-9a-fA-F:]*\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})\b", address, value
        )
        for mount in sorted(mounts, key=len, reverse=True):
            if value == mount or value.startswith(mount + "/"):
                value = str(self.folder(service, mount)) + value[len(mount) :]
        return value


@dataclass
class Container:
    """One service's image and configuration, as local processes would see them."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    healthchecks: list[list[str]]
    stop_grace: float


def duration(text: str | None, default: float) -> float:
    if not text:
        return default
    total = 0.0
    for amount, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(text)):
        total += float(amount) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[unit]
    return total


def healthcheck_argv(test: list[str] | str | None) -> list[str] | None:
    if test is None:
        return None
    if isinstance(test, str):
        return ["/bin/sh", "-c", test]
    if test[0] == "CMD":
        return test[1:]
    if test[0] == "CMD-SHELL":
        return ["/bin/sh", "-c", test[1]]
    return None  # NONE: disabled


def container_of(
    sandbox: Sandbox,
    name: str,
    service: dict,
    stages: dict[str, Stage],
    bin_dir: Path,
    repo: Path,
    extra_args: list[str] | None = None,
) -> Container:
    mounts = [
        volume["target"] if isinstance(volume, dict) else str(volume).split(":")[1]
        for volume in service.get("volumes", [])
    ]
    build = service.get("build")
    if build:
        image = image_of(stages, build["target"])
    else:
        image = Image(
            env={}, workdir="/data", entrypoint=[], cmd=[], healthcheck=None, user="", files={}
        )
    mounts.append(image.workdir)

    # PATH: the files the image puts in /usr/local/bin, then this machine's PATH.
    path_dir = sandbox.root / name / "_bin"
    path_dir.mkdir(parents=True, exist_ok=True)
    for container_path, (source, source_stage) in image.files.items():
        if not container_path.startswith("/usr/local/bin/"):
            continue
        local = bin_dir / Path(source).name if source_stage else repo / source
        link = path_dir / Path(container_path).name
        if not link.exists():
            link.symlink_to(local.resolve())

    env = {"PATH": f"{path_dir}:{os.environ['PATH']}", "HOME": str(sandbox.folder(name, "/home"))}
    env.update(image.env)
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment if "=" in item)
    env.update({key: str(value) for key, value in environment.items() if value is not None})
    env = {
        key: value if key in ("PATH", "HOME") else sandbox.rewrite(name, value, mounts)
        for key, value in env.items()
    }
    entrypoint = service.get("entrypoint") or image.entrypoint
    command = service.get("command") or image.cmd
    if extra_args is not None:
        command = extra_args
    argv = [sandbox.rewrite(name, str(word), mounts) for word in entrypoint + command]
    healthchecks = []
    compose_check = healthcheck_argv((service.get("healthcheck") or {}).get("test"))
    for check in (compose_check, image.healthcheck):
        if check and check not in healthchecks:
            healthchecks.append(check)
    return Container(
        name=name,
        argv=argv,
        env=env,
        cwd=sandbox.folder(name, image.workdir),
        healthchecks=healthchecks,
        stop_grace=duration(service.get("stop_grace_period"), 10.0),
    )


def run_check(container: Container, argv: list[str]) -> bool:
    try:
        return (
            subprocess.run(
                argv, env=container.env, cwd=container.cwd, capture_output=True, timeout=10
            ).returncode
            == 0
        )
    except subprocess.TimeoutExpired:
        return False


class Process:
    """A started service; output collected in a file so pipes never fill up."""

    def __init__(self, container: Container, log_dir: Path) -> None:
        self.container = container
        self.log = log_dir / f"{container.name}-{time.monotonic_ns()}.log"
        self.popen = subprocess.Popen(
            container.argv,
            env=container.env,
            cwd=container.cwd,
            stdin=subprocess.DEVNULL,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, predicate, what: str, timeout: float = STARTUP_TIMEOUT) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            if self.popen.poll() is not None:
                finding(
                    f"{self.container.name} exited ({self.popen.returncode}) before {what}:\n"
                    + indent(self.output())
                )
                return False
            time.sleep(0.1)
        finding(
            f"{self.container.name}: no {what} within {timeout:.0f} s:\n" + indent(self.output())
        )
        return False

    def stop(self) -> int | None:
        """SIGTERM to the entrypoint (tini), as `docker stop` does; the exit status, or None
        when it had to be killed after the grace period."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=self.container.stop_grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()
            return None


def indent(text: str, limit: int = 4000) -> str:
    return "\n".join("       " + line for line in text[-limit:].splitlines())


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def live_checks(
    repo: Path, bin_dir: Path, resolved: dict, stages: dict[str, Stage], password: str
) -> None:
    services = resolved["services"]
    with tempfile.TemporaryDirectory(prefix="p2pchat-deploy-") as root_name:
        root = Path(root_name)
        sandbox = Sandbox(root, services)
        started: list[Process] = []
        try:
            live_stack(repo, bin_dir, services, stages, sandbox, root, started, password)
        finally:
            for process in reversed(started):
                if process.popen.poll() is None:
                    os.killpg(process.popen.pid, signal.SIGKILL)
                    process.popen.wait()


def live_stack(repo, bin_dir, services, stages, sandbox, root, started, password) -> None:
    # Redis: the image's own server, so only its command is ours; here it is the local
    # redis-server with the same arguments, on a free loopback port, in a temporary folder.
    redis = container_of(sandbox, "redis", services["redis"], stages, bin_dir, repo)
    redis_port = sandbox.port("redis", 6379)
    redis.argv += ["--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(redis.cwd)]
    # Its healthcheck talks to the default port: a redis-cli on PATH that means this one.
    shim = root / "redis" / "_bin" / "redis-cli"
    shim.write_text(f'#!/bin/sh\nexec {shutil.which("redis-cli")} -p {redis_port} "$@"\n')
    shim.chmod(0o755)
    redis_process = Process(redis, root)
    started.append(redis_process)
    if not healthy(redis_process):
        return
    # What a container without the password gets: nothing but the refusal.
    anonymous = subprocess.run(
        [shutil.which("redis-cli"), "-p", str(redis_port), "PUBLISH", "p2pchat:announce", "x"],
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=10,
    )
    if "NOAUTH" in anonymous.stdout + anonymous.stderr:
        ok("redis refuses a client without the password (NOAUTH)")
    else:
        finding(f"redis accepts a client without the password:\n{indent(anonymous.stdout)}")

    discovery = container_of(sandbox, "discovery", services["discovery"], stages, bin_dir, repo)
    refused_without_password(discovery, redis_port, password)

    # Discovery, exactly as configured; its healthchecks must fail before it listens.
    for check in discovery.healthchecks:
        if run_check(discovery, check):
            finding(f"discovery healthcheck {check} passes with no server running")
    discovery_process = Process(discovery, root)
    started.append(discovery_process)
    if not healthy(discovery_process):
        return
    ok("discovery connects to redis with the password from REDIS_URL")
    for port in services["discovery"].get("ports", []):
        if isinstance(port, dict):
            target = int(port["target"])
        else:
            target = int(str(port).split(":")[-1].split("/")[0])
        if accepts(sandbox.port("discovery", target)):
            ok(f"discovery answers on published container port {target}")
        else:
            finding(f"discovery publishes container port {target} but nothing listens there")

    # Two clients, as `docker compose run client --user NAME ...` starts them.
    def client(*args: str) -> Container:
        return container_of(
            sandbox, "client", services["client"], stages, bin_dir, repo, list(args)
        )

    alice = Process(client("--user", "alice", "listen", "--json"), root)
    started.append(alice)
    if not alice.wait_for(lambda: '"online"' in alice.output(), "online event"):
        return
    sender = client("--user", "bob", "send", "alice", "hello from bob")
    sent = subprocess.run(
        sender.argv, env=sender.env, cwd=sender.cwd, capture_output=True, text=True, timeout=30
    )
    if sent.returncode != 0:
        finding(f"client send failed ({sent.returncode}):\n{indent(sent.stdout + sent.stderr)}")
        return
    if not alice.wait_for(lambda: "hello from bob" in alice.output(), "message from bob"):
        return
    ok("two clients on the compose network chat (send, listen --json)")

    # The documented operator command: `docker compose exec discovery p2pchat-discovery
    # announce TEXT` (exec: the container's environment, no entrypoint).
    announce = subprocess.run(
        ["p2pchat-discovery", "announce", "deploy check"],
        env=discovery.env,
        cwd=discovery.cwd,
        capture_output=True,
        text=True,
        timeout=30,
    )
    if announce.returncode != 0:
        finding(f"announce failed:\n{indent(announce.stdout + announce.stderr)}")
    elif alice.wait_for(lambda: "deploy check" in alice.output(), "announcement"):
        ok("`exec discovery p2pchat-discovery announce` reaches clients")

    # `docker stop`: SIGTERM to the entrypoint, a clean exit within the grace period.
    for process in (alice, discovery_process):
        status = process.stop()
        if status == 0:
            ok(f"{process.container.name} exits 0 on SIGTERM through tini")
        else:
            finding(
                f"{process.container.name}: SIGTERM gave exit status {status} (None: killed "
                f"after {process.container.stop_grace:.0f} s):\n" + indent(process.output())
            )


def refused_without_password(discovery: Container, redis_port: int, password: str) -> None:
    """Discovery given no password, or a wrong one, stops at start with Redis's refusal in
    its output, and without printing the password it was given."""
    wrong = secrets.token_hex(16)
    for url, refusal in (
        (f"redis://127.0.0.1:{redis_port}", "NOAUTH"),
        (f"redis://:{wrong}@127.0.0.1:{redis_port}", "authentication failed"),
    ):
        try:
            run = subprocess.run(
                discovery.argv,
                env={**discovery.env, "REDIS_URL": url},
                cwd=discovery.cwd,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=STARTUP_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            finding(f"discovery with REDIS_URL {url} neither started nor stopped in time")
            continue
        output = run.stdout + run.stderr
        if run.returncode == 0 or refusal not in output:
            finding(
                f"discovery with REDIS_URL {url}: exit {run.returncode}, expected a failure "
                f"saying {refusal!r}:\n{indent(output)}"
            )
        elif wrong in output or password in output:
            finding(f"discovery prints the Redis password when it is refused:\n{indent(output)}")
        else:
            ok(f"discovery stops at start on {refusal!r}, without printing the password")


def healthy(process: Process) -> bool:
    container = process.container
    if not container.healthchecks:
        finding(f"{container.name} has no healthcheck")
        return False
    for check in container.healthchecks:
        if not process.wait_for(lambda: run_check(container, check), f"healthy {check}"):
            return False
    count = len(container.healthchecks)
    ok(f"{container.name} starts as configured and passes {count} healthcheck(s)")
    return True


# ---------------------------------------------------------------------------------------------


def compose_config(
    repo: Path, variables: dict[str, str], file: str = COMPOSE_FILE
) -> subprocess.CompletedProcess:
    """`docker compose config` of `file` with only `variables` set."""
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/"), **variables}
    return subprocess.run(
        ["docker-compose", "--file", file, "--profile", "client", "config"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
    )


def resolved_compose(repo: Path, password: str) -> dict:
    """The file as Compose would run it by default: no variables set but the password,
    which has no default."""
    result = compose_config(repo, {PASSWORD_VARIABLE: password})
    if result.returncode != 0:
        raise SystemExit(f"docker-compose config failed:\n{result.stderr}")
    return yaml.safe_load(result.stdout)


def main() -> int:
    repo, bin_dir = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    raw = yaml.safe_load((repo / COMPOSE_FILE).read_text())
    # A fresh password each run, as an operator makes one: nothing here is a real secret.
    password = secrets.token_hex(16)
    resolved = resolved_compose(repo, password)
    dockerfiles = {
        (repo / s["build"].get("context", ".") / s["build"].get("dockerfile", "Dockerfile"))
        for s in raw["services"].values()
        if s.get("build")
    }
    if len(dockerfiles) != 1:
        finding(f"expected one Dockerfile for all services, found {sorted(dockerfiles)}")
        return 1
    stages = parse_dockerfile(dockerfiles.pop())
    static_checks(repo, bin_dir, raw, stages)
    redis_access_checks(compose_config(repo, {}), resolved, password)
    cluster_checks(repo, bin_dir, resolved, password)
    if not findings:
        live_checks(repo, bin_dir, resolved, stages, password)
    if findings:
        print(f"check_deploy: {len(findings)} finding(s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
