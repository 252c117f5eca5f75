"""Two test hosts joined by a rate-limited link, made with network namespaces (root only).

    with SlowLink(rate_mbit=200, delay_ms=5) as link:
        link.run(0, ["torchrun", ...])        # a command inside host 0's namespace

Each host is a namespace with one end of a veth pair; `tc tbf` (plus optional netem
delay) shapes both ends. Traffic only ever goes between these two namespaces. Everything
is removed on exit, also after an exception or Ctrl-C (and at interpreter exit).
"""
from __future__ import annotations

import atexit
import os
import signal
import subprocess
import uuid

SUBNET = "10.213.7"


def _sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


def available() -> str | None:
    """None when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root (ip netns)"
    for tool in ("ip", "tc"):
        if _sh("which", tool, check=False).returncode:
            return f"`{tool}` not found (install iproute2)"
    probe = f"qsrprobe{os.getpid()}"
    if _sh("ip", "netns", "add", probe, check=False).returncode:
        return "ip netns add failed (no CAP_SYS_ADMIN?)"
    _sh("ip", "netns", "del", probe, check=False)
    return None


class SlowLink:
    def __init__(self, rate_mbit: float, delay_ms: float = 0.0):
        tag = uuid.uuid4().hex[:6]
        self.rate_mbit, self.delay_ms = rate_mbit, delay_ms
        self.namespaces = [f"qsr{tag}a", f"qsr{tag}b"]
        self.devices = [f"vq{tag}a", f"vq{tag}b"]
        self.addresses = [f"{SUBNET}.1", f"{SUBNET}.2"]
        self._made = False

    def __enter__(self) -> SlowLink:
        atexit.register(self.close)
        previous = signal.getsignal(signal.SIGTERM)
        if previous in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, lambda *_: (self.close(), os._exit(143)))
        try:
            self._make()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _make(self) -> None:
        self._made = True
        a, b = self.namespaces
        for ns in self.namespaces:
            _sh("ip", "netns", "add", ns)
        _sh("ip", "link", "add", self.devices[0], "netns", a, "type", "veth", "peer", "name", self.devices[1], "netns", b)
        for ns, dev, addr in zip(self.namespaces, self.devices, self.addresses):
            self.exec(ns, "ip", "link", "set", "lo", "up")
            self.exec(ns, "ip", "addr", "add", f"{addr}/30", "dev", dev)
            self.exec(ns, "ip", "link", "set", dev, "up")
            self.exec(ns, "tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "tbf",
                      "rate", f"{self.rate_mbit}mbit", "burst", "512kb", "latency", "100ms")
            if self.delay_ms:
                done = _sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "parent", "1:1",
                           "handle", "10:", "netem", "delay", f"{self.delay_ms}ms", check=False)
                if done.returncode:
                    raise RuntimeError(f"cannot add a netem delay here ({done.stderr.strip()}); use delay 0")

    @staticmethod
    def exec(ns: str, *args: str) -> subprocess.CompletedProcess:
        return _sh("ip", "netns", "exec", ns, *args)

    def tx_bytes(self, host: int) -> int:
        """Bytes host `host` has sent over the link so far (the interface's counter)."""
        out = self.exec(self.namespaces[host], "cat", f"/sys/class/net/{self.devices[host]}/statistics/tx_bytes")
        return int(out.stdout.strip())

    def popen(self, host: int, cmd: list[str], env: dict | None = None, **kwargs) -> subprocess.Popen:
        """Start `cmd` inside host `host`'s namespace; gloo is bound to the link device."""
        full_env = {**os.environ, **(env or {}), "GLOO_SOCKET_IFNAME": self.devices[host]}
        return subprocess.Popen(["ip", "netns", "exec", self.namespaces[host], *cmd], env=full_env, **kwargs)

    def close(self) -> None:
        if not self._made:
            return
        self._made = False
        for ns in self.namespaces:
            # end whatever still runs inside before removing the namespace
            pids = _sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _sh("ip", "netns", "del", ns, check=False)
