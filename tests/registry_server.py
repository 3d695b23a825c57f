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


# ---------------------------------------------------------------------- bundle helpers for the tests
def make_bundle_files(root: Path, seed: int = 0, size: int = 4096) -> dict:
    """A fake bundle of a few KB: the registry treats files as opaque bytes. Returns the paths."""
    import random

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    cellm = root / "model.cellm"
    cellm.write_bytes(rng.randbytes(size))
    tok = root / "model.tokenizer.json"
    tok.write_text('{"model": {"type": "BPE"}, "seed": %d}' % seed)
    notice = root / "model.NOTICE"
    notice.write_text("Gemma is provided under and subject to the Gemma Terms of Use.\n")
    onnx = root / "onnx"
    (onnx / "sub").mkdir(parents=True, exist_ok=True)
    (onnx / "model.onnx").write_bytes(rng.randbytes(size // 2))
    (onnx / "model.onnx.data").write_bytes(rng.randbytes(size))
    (onnx / "sub" / "genai_config.json").write_text('{"model": {"type": "gemma3_text"}}')
    return {"cellm": cellm, "tokenizer": tok, "notice": notice, "onnx": onnx}


def make_spec(root: Path, name: str = "tiny-gemma", version: str = "0.1.0", seed: int = 0, **kw):
    from cellm.registry import BundleSpec

    f = make_bundle_files(root, seed=seed)
    return BundleSpec(
        name=name,
        version=version,
        cellm_file=f["cellm"],
        profile="int8-v1",
        onnx_dir=f["onnx"],
        tokenizer_files=(f["tokenizer"],),
        notice=f["notice"],
        source={"repo": "google/gemma-3-270m", "revision": "main", "commit": "abc123",
                "checkpoint_sha256": "0" * 64},  # fmt: skip
        profile_hash="1" * 64,
        gate_config_hash="2" * 64,
        metrics={"kl_mean": 0.0123, "top1_agreement": 0.981, "ppl_ratio": 1.004},
        **kw,
    )


PASSING = {"passed": True, "gate_class": "int8", "checks": [{"name": "kl_mean", "value": 0.0123,
                                                             "limit": 0.05, "passed": True}]}
FAILING = {"passed": False, "gate_class": "int8", "checks": [{"name": "kl_mean", "value": 0.4,
                                                              "limit": 0.05, "passed": False}]}
