"""``hf://org/name[@revision]`` sources through ``huggingface_hub.snapshot_download``.

Only safetensors, JSON, tokenizer and licence files are fetched. With ``HF_HUB_OFFLINE=1`` (read at
call time, as is ``HF_HUB_CACHE``) the snapshot is resolved from the local HF cache only. The
resolved commit hash (the snapshot directory name) is recorded in the provenance. Repositories that
only ship pickle weights (``.bin``/``.pt``/``.pth``/``.ckpt``) are refused.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cellm.errors import SourceError, SourceNotFoundError
from cellm.sources.checkpoint import PICKLE_SUFFIXES, Checkpoint, pickle_files, refuse_pickle

ALLOW_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.model", "NOTICE*", "LICENSE*"]
_REPO = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def parse_hf_spec(spec: str, revision: str | None = None) -> tuple[str, str | None]:
    """``hf://org/name[@rev]`` -> (repo_id, revision); ``revision`` must agree with ``@rev``."""
    body = spec[len("hf://") :] if spec.startswith("hf://") else spec
    repo, _, rev = body.partition("@")
    repo = repo.strip("/")
    if not _REPO.match(repo):
        raise SourceError(f"bad Hugging Face source {spec!r}: expected hf://org/name[@revision]")
    if rev and revision and rev != revision:
        raise SourceError(f"{spec!r} pins revision {rev!r} but revision={revision!r} was also given")
    return repo, (rev or revision or None)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_cache() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or str(constants.HF_HUB_CACHE)


def _refuse_if_pickle_only(repo: str, revision: str | None) -> bool:
    """Online only: list the repo's files and refuse pickle-only repos before downloading anything.

    Returns False when the Hub cannot be reached (the caller then resolves from the cache only)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        files = HfApi().list_repo_files(repo, revision=revision)
    except (RepositoryNotFoundError, RevisionNotFoundError, HfHubHTTPError):
        return True  # snapshot_download reports these (with the cache fallback)
    except Exception:  # noqa: BLE001 - connection errors of any HTTP stack: the Hub is unreachable
        return False
    if not any(f.endswith(".safetensors") for f in files):
        pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise refuse_pickle(f"hf://{repo}", pickles)
    return True


def open_hf(spec: str, revision: str | None = None) -> Checkpoint:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, rev = parse_hf_spec(spec, revision)
    cache = _hub_cache()
    offline = _offline()
    reachable = offline or _refuse_if_pickle_only(repo, rev)
    where = f"hf://{repo}" + (f"@{rev}" if rev else "")
    try:
        snap = snapshot_download(
            repo,
            revision=rev,
            cache_dir=cache,
            allow_patterns=ALLOW_PATTERNS,
            local_files_only=offline or not reachable,
        )
    except RevisionNotFoundError as exc:
        raise SourceNotFoundError(f"{where}: revision {rev!r} does not exist") from exc
    except GatedRepoError as exc:
        raise SourceError(f"{where}: gated repository; accept its licence and log in (hf auth login)") from exc
    except RepositoryNotFoundError as exc:
        raise SourceNotFoundError(f"{where}: repository not found (or private without a token)") from exc
    except LocalEntryNotFoundError as exc:
        mode = "HF_HUB_OFFLINE=1 is set" if offline else "the Hugging Face Hub is unreachable"
        raise SourceNotFoundError(
            f"{where} is not in the local Hugging Face cache ({cache}) and {mode}. "
            "Download it once with network access (unset HF_HUB_OFFLINE), or point HF_HUB_CACHE at a "
            "cache that holds it."
        ) from exc
    except OSError as exc:
        raise SourceNotFoundError(f"{where}: cannot fetch ({exc})") from exc
    snap_path = Path(snap)
    if not any(snap_path.glob("*.safetensors")):
        pickles = pickle_files(snap_path)
        if pickles or not (snap_path / "config.json").is_file():
            raise refuse_pickle(where, pickles) if pickles else SourceError(
                f"{where}: snapshot {snap_path} has no config.json / *.safetensors "
                "(cellm only accepts safetensors checkpoints)"
            )
        raise SourceError(
            f"{where}: snapshot {snap_path} has no *.safetensors weights; cellm only accepts "
            "safetensors checkpoints (the repository may only have pickle .bin/.pt weights)"
        )
    return Checkpoint(
        snap_path,
        name=repo.split("/")[-1],
        provenance={"spec": spec, "repo": repo, "revision": rev or "main", "commit": snap_path.name},
    )
