"""Artifact registry: gated publishing, manifests with lineage, channels, verified resumable pulls.

    from cellm.registry import open_registry, BundleSpec
    reg = open_registry()                      # $CELLM_REGISTRY or file://artifacts (relative to CWD)
    spec = BundleSpec.from_cellm("out/model.cellm", "gemma-3-270m-int8", "2026.11.28-1",
                                 onnx_dir="out/onnx", metrics=report)
    reg.publish(spec, verdict)                 # verdict: a passing cellm.gates.GateVerdict
    reg.pull("gemma-3-270m-int8@latest", "models/gemma")

Backends: ``file://PATH`` (content-addressed blobs, atomic, safe for concurrent publishers) and
``oci://HOST[:PORT]/NAMESPACE`` (any OCI registry, through ``oras``). See docs/REGISTRY.md.
"""

from cellm.registry.api import (
    DEFAULT_URL,
    PullResult,
    Registry,
    default_registry_url,
    open_registry,
    verdict_record,
    verify_dir,
)
from cellm.registry.bundle import BundleSpec
from cellm.registry.manifest import FileEntry, Manifest
from cellm.registry.names import Ref, parse_ref

Bundle = BundleSpec

__all__ = [
    "DEFAULT_URL",
    "Bundle",
    "BundleSpec",
    "FileEntry",
    "Manifest",
    "PullResult",
    "Ref",
    "Registry",
    "default_registry_url",
    "open_registry",
    "parse_ref",
    "verdict_record",
    "verify_dir",
]
