"""Separate hosts on one machine: Linux network namespaces joined by veth pairs to a private bridge.

    with Network(["storage", "head", "worker", "ci"]) as net:
        net["head"].popen(["ray", "start", ...], env={...})
        net["worker"].cut()   # unplug its cable; .plug() puts it back

Each host is a namespace with loopback up and one address on a /24 that no route of this machine already covers;
the bridge sits in the root namespace with the first address of that /24, so the test itself (the "operator")
reaches every host, and no host reaches anything else (no route beyond the /24). Commands run in a host with
`ip netns exec`, with exactly the environment given (plus PATH), never the caller's.

Teardown kills every process left in the namespaces (`ip netns pids`: only processes in these private
namespaces, so only what this test started, never another user's Ray or moto), then deletes the namespaces
(their veth ends go with them) and the bridge. It runs even when setup failed half-way.

Needs root (CAP_NET_ADMIN) and `ip` from iproute2; `available()` says why not when it cannot work.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from support import stop_processes

IP = shutil.which("ip") or "/usr/sbin/ip"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([IP, *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def available() -> str | None:
    """None when namespaces can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return f"network namespaces need root (CAP_NET_ADMIN); this test runs as uid {os.geteuid()}"
    if not Path(IP).exists():
        return "`ip` (iproute2) is not installed"
    probe = f"io-probe-{secrets.token_hex(3)}"
    proc = subprocess.run([IP, "netns", "add", probe], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        return f"`ip netns add` failed here: {proc.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def free_subnet() -> ipaddress.IPv4Network:
    """A 10.x.y.0/24 that no address or route of this machine overlaps (random, so parallel runs differ)."""
    used = []
    for line in (
        _ip("-4", "route", "show", "table", "all").stdout + _ip("-4", "-o", "addr").stdout
    ).splitlines():
        for word in line.split():
            try:
                used.append(ipaddress.ip_network(word, strict=False))
            except ValueError:
                continue
    for _ in range(200):
        net = ipaddress.ip_network(f"10.{secrets.randbelow(200) + 50}.{secrets.randbelow(254)}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise RuntimeError("no free 10.x.y.0/24 subnet found")


@dataclass
class Host:
    """One namespace: `name` is its role, `ns` the namespace, `ip` its address, `veth` the root-side cable end."""

    name: str
    ns: str
    ip: str
    veth: str
    procs: list[subprocess.Popen] = field(default_factory=list)

    def argv(self, cmd: list[str], env: dict[str, str] | None = None) -> list[str]:
        """`cmd` run in this host with exactly `env` (PATH defaults to the caller's)."""
        full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env or {})}
        return [IP, "netns", "exec", self.ns, "env", "-i", *(f"{k}={v}" for k, v in full.items()), *cmd]

    def run(
        self,
        cmd: list[str],
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        timeout: float = 120,
        check: bool = True,
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.argv(cmd, env), cwd=cwd, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"[{self.name}] {cmd} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
            )
        return proc

    def popen(
        self, cmd: list[str], env: dict[str, str] | None = None, cwd=None, log: Path | None = None, **kw
    ) -> subprocess.Popen:
        """A background process in this host (stdout+stderr to `log`); killed at teardown if still running."""
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
        try:
            proc = subprocess.Popen(self.argv(cmd, env), cwd=cwd, stdout=out, stderr=subprocess.STDOUT, **kw)
        finally:
            if log:
                out.close()
        self.procs.append(proc)
        return proc

    def pids(self) -> list[int]:
        """Every process living in this namespace."""
        proc = _ip("netns", "pids", self.ns, check=False)
        return [int(p) for p in proc.stdout.split() if p.strip().isdigit()]

    def cut(self) -> None:
        """Unplug this host: its cable end on the bridge goes down (its own end and address stay)."""
        _ip("link", "set", self.veth, "down")

    def plug(self) -> None:
        _ip("link", "set", self.veth, "up")

    def kill_all(self, grace_s: float = 10.0) -> None:
        """SIGTERM every process in this namespace, SIGKILL what is left after `grace_s`."""
        stop_processes(self.pids, grace_s, kill_s=5.0, poll_s=0.2)
        for p in self.procs:  # reap our direct children (`ip netns exec` wrappers)
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()


class Network:
    """Hosts on a private bridge; a context manager that always tears everything down."""

    def __init__(self, names: list[str]):
        self.tag = secrets.token_hex(2)  # interface names stop at 15 characters
        self.subnet = free_subnet()
        addrs = list(self.subnet.hosts())
        self.gateway = str(addrs[0])
        self.bridge = f"iobr{self.tag}"
        self.hosts = {
            name: Host(name, f"io-{self.tag}-{name}", str(addrs[i + 1]), f"io{self.tag}{name[:6]}")
            for i, name in enumerate(names)
        }

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __enter__(self) -> Network:
        try:
            self.create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def create(self) -> None:
        bits = self.subnet.prefixlen
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/{bits}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for h in self.hosts.values():
            _ip("netns", "add", h.ns)
            peer = f"{h.veth}p"
            _ip("link", "add", h.veth, "type", "veth", "peer", "name", peer)
            _ip("link", "set", peer, "netns", h.ns)
            _ip("link", "set", h.veth, "master", self.bridge)
            _ip("link", "set", h.veth, "up")
            ns = ["netns", "exec", h.ns, IP]
            _ip(*ns, "link", "set", "lo", "up")
            _ip(*ns, "link", "set", peer, "name", "eth0")
            _ip(*ns, "addr", "add", f"{h.ip}/{bits}", "dev", "eth0")
            _ip(*ns, "link", "set", "eth0", "up")
        self._wait_reachable()

    def _wait_reachable(self, timeout_s: float = 20.0) -> None:
        """Wait until every cable is up and its bridge port forwards (STP is off, so that is at once)."""
        deadline = time.monotonic() + timeout_s
        for h in self.hosts.values():
            port = Path(f"/sys/class/net/{h.veth}/brport/state")
            while not (port.is_file() and port.read_text().strip() == "3"):  # BR_STATE_FORWARDING
                if time.monotonic() > deadline:
                    raise RuntimeError(f"bridge port {h.veth} of host {h.name} is not forwarding")
                time.sleep(0.1)

    def close(self) -> None:
        """Kill what runs in the hosts, delete the namespaces (and so their veths) and the bridge; never raises."""
        for h in self.hosts.values():
            try:
                h.kill_all()
            except Exception as err:  # noqa: BLE001 - teardown goes on
                print(f"netns: cleaning {h.ns}: {err}")
        for h in self.hosts.values():
            _ip("netns", "del", h.ns, check=False)
            _ip("link", "del", h.veth, check=False)
        _ip("link", "del", self.bridge, check=False)

    def leftovers(self) -> list[str]:
        """Namespaces and links of this network that still exist (empty after close)."""
        names = set(_ip("netns", "list", check=False).stdout.split())
        links = _ip("-o", "link", check=False).stdout
        out = [h.ns for h in self.hosts.values() if h.ns in names]
        out += [
            n
            for n in [self.bridge, *(h.veth for h in self.hosts.values())]
            if f" {n}:" in links or f" {n}@" in links
        ]
        return out
