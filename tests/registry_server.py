"""Start and stop a real OCI registry (Debian's ``docker-registry``, distribution 2.8) on 127.0.0.1.

Used by the oci:// tests: each run gets its own process, storage root and free port; the process
is stopped by its PID (never by name). Install with ``apt-get install docker-registry``.
"""

from __future__ import annotations

import dataclasses
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

CONFIG = """\
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class RegistryServer:
    proc: subprocess.Popen
    port: int
    root: Path  # storage root (docker/registry/v2/... below it)
    log: Path

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, namespace: str = "cellm") -> str:
        return f"oci://{self.host}/{namespace}"

    def blob_path(self, sha256_hex: str) -> Path:
        return self.root / "docker/registry/v2/blobs/sha256" / sha256_hex[:2] / sha256_hex / "data"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_registry(workdir: Path, timeout: float = 30.0) -> RegistryServer:
    exe = shutil.which("docker-registry")
    if exe is None:
        raise RuntimeError("docker-registry is not installed: apt-get install -y docker-registry")
    workdir.mkdir(parents=True, exist_ok=True)
    root = workdir / "storage"
    root.mkdir(exist_ok=True)
    log = workdir / "registry.log"
    last_err = None
    for _ in range(3):  # a free port can be taken between probing and binding: retry
        port = free_port()
        cfg = workdir / "config.yml"
        cfg.write_text(CONFIG.format(root=root, port=port))
        with open(log, "ab") as logf:
            proc = subprocess.Popen([exe, "serve", str(cfg)], stdout=logf, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)  # fmt: skip
        server = RegistryServer(proc, port, root, log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2) as r:
                    if r.status == 200:
                        return server
            except OSError as exc:
                last_err = exc
            time.sleep(0.1)
        server.stop()
    raise RuntimeError(f"docker-registry did not become healthy ({last_err}); log:\n{log.read_text()[-2000:]}")
