"""Replicas behind a real router: N ``labkit serve`` processes on loopback, each pinned to its share of the cores
with its own torch thread count, and vLLM's router (``vllm-router``, a maintained Rust load balancer for
OpenAI-compatible servers) in front. Every process is started and stopped by its pid, never by name; leaving the
``with`` block stops them all, whatever happened inside."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from labkit import LabkitError

POLICIES = ("round_robin", "cache_aware", "power_of_two", "consistent_hash", "random")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def router_binary() -> str:
    """The ``vllm-router`` executable beside this Python, or on PATH; a clear error when it is not installed."""
    here = Path(sys.executable).parent / "vllm-router"
    found = str(here) if here.exists() else shutil.which("vllm-router")
    if not found:
        raise LabkitError("vllm-router is not installed: pip install vllm-router (its wheel is for Linux on x86-64; "
                          "make test installs it with the dev extra)")
    return found


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float, path: str = "/health") -> None:
    """Poll ``url + path`` until it answers 200; fail at once if the process exits, or after ``timeout_s``."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise LabkitError(f"{' '.join(proc.args[:4])} … exited with status {proc.returncode} before it served")
        try:
            with urllib.request.urlopen(url + path, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise LabkitError(f"{url}{path} did not answer within {timeout_s:.0f} s")


def core_shares(n: int, cores: list[int] | None = None) -> list[list[int]]:
    """``cores`` (default: the ones this process may use) split into ``n`` equal, disjoint shares."""
    cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
    if not isinstance(n, int) or n < 1 or n > len(cores):
        raise LabkitError(f"replicas={n!r} must be between 1 and the {len(cores)} cores available, one core each "
                          "at least")
    per = len(cores) // n
    return [cores[i * per:(i + 1) * per] for i in range(n)]


@dataclass
class Replica:
    url: str
    cores: list[int]
    proc: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.proc.pid

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as resp:
            return resp.read().decode()


@dataclass
class Fleet:
    """``with Fleet(2, model="smollm2-135m") as f:`` → two pinned replicas; ``f.route("cache_aware")`` starts the
    router in front of them and returns its URL (one router at a time; a new policy replaces the old router)."""

    replicas: int = 2
    model: str = "smollm2-135m"
    serve_args: tuple[str, ...] = ()
    cores: list[int] | None = None
    startup_timeout_s: float = 180.0
    members: list[Replica] = field(default_factory=list)
    router: subprocess.Popen | None = None
    log_dir: Path | None = None

    def __enter__(self) -> Fleet:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _log(self, name: str):
        if self.log_dir is None:
            return subprocess.DEVNULL
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - the child holds it

    def start(self) -> None:
        for i, share in enumerate(core_shares(self.replicas, self.cores)):
            port = free_port()
            env = {**os.environ, "OMP_NUM_THREADS": str(len(share))}  # torch's threads
            cmd = [sys.executable, "-m", "labkit.cli", "serve", "--model", self.model, "--port", str(port),
                   *self.serve_args]
            proc = subprocess.Popen(cmd, env=env, stdout=self._log(f"replica{i}"), stderr=subprocess.STDOUT,
                                    preexec_fn=lambda s=share: os.sched_setaffinity(0, s))
            self.members.append(Replica(f"http://127.0.0.1:{port}", share, proc))
        for r in self.members:
            wait_healthy(r.url, r.proc, self.startup_timeout_s)

    def route(self, policy: str = "round_robin", *extra: str) -> str:
        """Start ``vllm-router`` with ``policy`` in front of the replicas; returns its URL once it serves."""
        if policy not in POLICIES:
            raise LabkitError(f"policy={policy!r} is not one of {', '.join(POLICIES)}")
        self.stop_router()
        port = free_port()
        cmd = [router_binary(), "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
               "--worker-urls", *[r.url for r in self.members], "--log-level", "warning", *extra]
        self.router = subprocess.Popen(cmd, stdout=self._log(f"router-{policy}"), stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, self.router, 60, path="/v1/models")
        return url

    def kill(self, i: int) -> None:
        """Kill replica ``i`` (SIGKILL, by pid): what a crashed machine looks like to the router."""
        self.members[i].proc.kill()
        self.members[i].proc.wait(timeout=10)

    def stop_router(self) -> None:
        if self.router is not None:
            _stop(self.router)
            self.router = None

    def stop(self) -> None:
        self.stop_router()
        for r in self.members:
            _stop(r.proc)
        self.members.clear()

    def prefix_hits(self) -> list[dict[str, float]]:
        """Each live replica's prefix-cache counters (tokens queried and hit) from its /metrics."""
        from labkit.scale.load import metric

        out = []
        for r in self.members:
            if r.proc.poll() is None:
                text = r.metrics()
                out.append({"queries": metric(text, "labkit:prefix_cache_queries_total"),
                            "hits": metric(text, "labkit:prefix_cache_hits_total")})
        return out


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 10 s, by pid."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

