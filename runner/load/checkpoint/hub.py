"""Hugging Face Hub checkpoints, through ``huggingface_hub``: online, or offline from the cache alone.

Only the files a run needs are fetched (``allow_patterns`` naming them exactly): the weights,
in safetensors when the repo has them, else PyTorch pickles, plus ``config.json`` and, when the
repo has them, the tokenizer and generation config files (``METADATA_NAMES``). A sharded
checkpoint's index is fetched first, then exactly the shards it names, so a repo that also
carries, say, a consolidated copy of the weights costs one copy.

Offline (``HF_HUB_OFFLINE=1``, or the Hub unreachable) the cache answers: ``refs/<branch>``
resolves the revision, and the snapshot folder (named by its commit) holds the files. The
resolved commit is recorded as the checkpoint's ``revision``, for ``report.json``.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
from pathlib import Path

from runner.load.checkpoint.base import CONFIG_NAME, Checkpoint, one_line, shard_path
from runner.load.checkpoint.files import INDEX_NAME, open_local
from runner.load.checkpoint.pickled import NOT_WEIGHTS, PICKLE_INDEX_NAME, PICKLE_SUFFIXES
from runner.config import CheckpointSpec
from runner.errors import CheckpointError

log = logging.getLogger(__name__)

# Beside the weights, for the tokenizer and the generation defaults: optional, fetched when the repo has them.
METADATA_NAMES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_TRUE = {"1", "ON", "YES", "TRUE"}


def open_hub(spec: CheckpointSpec) -> Checkpoint:
    """The checkpoint of ``spec.repo_id`` at ``spec.revision``, downloaded if needed, headers read.

    Raises:
        CheckpointError: one line naming the repo and revision, when the repo or revision does not exist,
            is not in the cache while offline, or cannot be downloaded; and whatever ``open_local`` raises.
    """
    try:
        import huggingface_hub  # noqa: F401
    except ImportError as e:
        raise CheckpointError("checkpoint=hub needs huggingface_hub: pip install huggingface_hub") from e
    assert spec.repo_id is not None  # the schema requires it for this source
    hub = _Hub(spec.repo_id, spec.revision, _cache_dir(spec.cache_dir))
    files = hub.listing()
    if files is None:  # neither the Hub nor the cache knows the revision: this asks for it, and names what lacks
        folder = hub.download(["*.safetensors", INDEX_NAME, "*.bin", PICKLE_INDEX_NAME, CONFIG_NAME])
        files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    wanted = weight_files(files)
    if not any(f != CONFIG_NAME for f in wanted):
        shown = ", ".join(sorted(files)[:8]) + (", ..." if len(files) > 8 else "")
        raise CheckpointError(f"checkpoint.repo_id: {hub.name} holds no .safetensors or PyTorch .bin/.pt weights at "
                              f"its top level (it has: {shown or 'no files'}); is it a model repo?")
    # Offline the cache holds what it holds: asking for a listed file it lacks would fail the run.
    optional = [] if hub.offline else [f for f in METADATA_NAMES if f in files]
    folder = hub.download([glob.escape(f) for f in wanted + optional])
    index = next((name for name in wanted if name in (INDEX_NAME, PICKLE_INDEX_NAME)), None)
    if index is not None:  # now the shards it names: a second, exact request
        # Pinned to the commit just resolved: the shards match the index even if the branch moves meanwhile.
        folder = hub.download([glob.escape(f) for f in sorted({*wanted, *_shards(folder / index)})], folder.name)
    weights = [name for name in wanted if name != CONFIG_NAME]
    target = folder / index if index else folder / weights[0] if len(weights) == 1 else folder
    checkpoint = open_local(target, spec.allow_pickle, source="hub")
    checkpoint.revision = folder.name
    log.info("Hub checkpoint %s at %s: commit %s", hub.repo, hub.revision, folder.name)
    return checkpoint


def weight_files(files: list[str]) -> list[str]:
    """The files of a repo listing a run needs, exactly: the weights (safetensors if any, else pickles) and config.

    Only top-level files count: subfolders hold other formats or other models (``onnx/``, ``original/``).
    A sharded checkpoint is named by its index alone; its shards are known once it is read.
    """
    top = {f for f in files if "/" not in f}
    config = [CONFIG_NAME] if CONFIG_NAME in top else []
    safetensors = sorted(f for f in top if f.endswith(".safetensors"))
    pickles = sorted(f for f in top if f.endswith(PICKLE_SUFFIXES) and not f.startswith(NOT_WEIGHTS))
    if INDEX_NAME in top:
        weights = [INDEX_NAME]
    elif safetensors:
        weights = ["model.safetensors"] if "model.safetensors" in top else safetensors
    elif PICKLE_INDEX_NAME in top:
        weights = [PICKLE_INDEX_NAME]
    elif pickles:
        weights = ["pytorch_model.bin"] if "pytorch_model.bin" in top else pickles
    else:
        weights = []
    return weights + config


class _Hub:
    """One repo at one revision, and the cache that holds (or will hold) it."""

    def __init__(self, repo: str, revision: str, cache_dir: Path):
        from huggingface_hub import constants

        self.repo, self.revision, self.cache_dir = repo, revision, cache_dir
        self.name = f"{repo} (revision {revision})"
        # HF_HUB_OFFLINE is read when huggingface_hub is imported; the variable as it is now counts too.
        self.offline = constants.HF_HUB_OFFLINE or any(
            os.environ.get(v, "").upper() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
        self.unreachable: str | None = "is off (HF_HUB_OFFLINE=1)" if self.offline else None

    @property
    def storage(self) -> Path:
        return self.cache_dir / f"models--{self.repo.replace('/', '--')}"

    def listing(self) -> list[str] | None:
        """The repo's files: from the Hub when online, else from the cache; None when neither knows."""
        if not self.offline:
            from huggingface_hub import HfApi
            try:
                return HfApi().list_repo_files(self.repo, revision=self.revision)
            except Exception as e:  # sorted below: not found is final, a network failure is not
                self._raise_if_not_found(e)
                if not _is_network_error(e):
                    raise
                self.unreachable = f"could not be reached ({type(e).__name__}: {_short(e)})"
                self.offline = True  # from now on the cache answers: no second round of retries
                log.warning("The Hub could not be reached (%s); looking for %s in the cache %s",
                            _short(e), self.name, self.cache_dir)
        return self._cached_listing()

    def _cached_listing(self) -> list[str] | None:
        commit = self._cached_commit()
        if commit is None:
            return None
        import huggingface_hub
        cached_tree = getattr(huggingface_hub, "get_cached_repo_tree", None)  # huggingface_hub >= 1.x
        if cached_tree is not None:  # the repo's full listing, recorded when it was downloaded
            try:
                return [f.path for f in cached_tree(self.repo, revision=commit, cache_dir=str(self.cache_dir))]
            except Exception as e:  # CachedRepoTreeNotFoundError is a bare Exception: no listing
                log.debug("No cached listing of %s: %s", self.name, e)
        snapshot = self.storage / "snapshots" / commit
        if not snapshot.is_dir():
            return None
        return [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]

    def _cached_commit(self) -> str | None:
        if _COMMIT.fullmatch(self.revision):
            return self.revision
        try:
            return (self.storage / "refs" / self.revision).read_text(encoding="utf-8").strip() or None
        except (OSError, UnicodeDecodeError):
            return None

    def download(self, patterns: list[str], commit: str | None = None) -> Path:
        """The snapshot folder holding the files ``patterns`` match, fetched if needed; named by its commit."""
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import LocalEntryNotFoundError
        try:
            folder = Path(snapshot_download(self.repo, revision=commit or self.revision,
                                            cache_dir=str(self.cache_dir), allow_patterns=patterns,
                                            local_files_only=self.offline))
        except LocalEntryNotFoundError as e:
            if type(e).__name__ == "IncompleteSnapshotError":  # huggingface_hub >= 1.x checks the cached listing
                found = re.search(r"are missing \(([^)]*)\)", str(e))
                missing = found.group(1) if found else ", ".join(patterns)
                raise CheckpointError(f"checkpoint.repo_id: the cached snapshot of {self.name} in {self.cache_dir} "
                                      f"lacks files this run needs ({missing}) and the Hub "
                                      f"{self._why_offline(e)}; {self._how_to_provide()}") from e
            raise CheckpointError(f"checkpoint.repo_id: {self._what_is_missing()} and the Hub "
                                  f"{self._why_offline(e)}; {self._how_to_provide()}") from e
        except Exception as e:  # sorted below
            self._raise_if_not_found(e)
            if not _is_network_error(e):
                raise
            raise CheckpointError(f"checkpoint.repo_id: cannot download {self.name} ({type(e).__name__}: "
                                  f"{_short(e)}); {self._how_to_provide()}") from e
        if not _COMMIT.fullmatch(folder.name):
            raise CheckpointError(f"checkpoint.repo_id: {self.name} resolved to {folder}, not a snapshot folder "
                                  "named by its commit; is checkpoint.cache_dir a Hugging Face cache?")
        return folder

    def _raise_if_not_found(self, e: Exception) -> None:
        """A repo or revision that does not exist (or that the user may not see), or an invalid name."""
        from huggingface_hub.utils import (GatedRepoError, HFValidationError, RepositoryNotFoundError,
                                           RevisionNotFoundError)
        if isinstance(e, HFValidationError):
            raise CheckpointError(f"checkpoint.repo_id: {self.name} is not a valid repo id and revision "
                                  f"({_short(e)})") from e
        if isinstance(e, RevisionNotFoundError):
            raise CheckpointError(f"checkpoint.revision: {self.repo} has no revision {self.revision} on the Hub; "
                                  "use a branch, a tag or a commit of the repo") from e
        if isinstance(e, GatedRepoError):
            raise CheckpointError(f"checkpoint.repo_id: {self.name} is gated: accept its terms on the Hub, then "
                                  "log in (hf auth login) or set HF_TOKEN") from e
        if isinstance(e, RepositoryNotFoundError):
            raise CheckpointError(f"checkpoint.repo_id: {self.name} is not on the Hub, or is private (log in with "
                                  "hf auth login or set HF_TOKEN); check the repo id") from e

    def _what_is_missing(self) -> str:
        if not self.storage.is_dir():
            return f"{self.name} is not in the Hugging Face cache {self.cache_dir}"
        refs = sorted(p.name for p in (self.storage / "refs").glob("*") if p.is_file())
        commits = sorted(p.name[:12] for p in (self.storage / "snapshots").glob("*") if p.is_dir())
        have = ", ".join([*refs, *commits]) or "nothing"
        return f"{self.repo} is in the Hugging Face cache {self.cache_dir} but not at revision {self.revision} " \
               f"(cached: {have})"

    def _why_offline(self, e: Exception) -> str:
        if self.unreachable:
            return self.unreachable
        cause = e.__cause__ or e.__context__
        return f"could not be reached ({type(cause).__name__})" if cause else "could not be reached"

    def _how_to_provide(self) -> str:
        return (f"download it where there is network (hf download {self.repo} --revision {self.revision}, or "
                f"huggingface-cli download with huggingface_hub < 1.0) and copy that cache here, "
                f"set checkpoint.cache_dir to a cache that holds it, "
                f"or use checkpoint=local checkpoint.path=<a folder with its weights>")


def _cache_dir(configured: Path | None) -> Path:
    """``checkpoint.cache_dir``, else ``HF_HUB_CACHE`` as it is now, else huggingface_hub's own default."""
    if configured is not None:
        return configured.expanduser()
    from huggingface_hub import constants
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.path.expandvars(os.environ[variable])).expanduser()
    return Path(constants.HF_HUB_CACHE)


def _shards(index: Path) -> list[str]:
    """The shard files an index names (checked again, fully, when the checkpoint is opened)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted({name for name in weight_map.values() if isinstance(name, str)})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index}: not a valid index; expected JSON with a 'weight_map' object of tensor "
                              "name -> shard file name") from e
    for name in names:  # nothing is fetched or opened outside the repo
        shard_path(index, name)
    return names


def _is_network_error(e: BaseException) -> bool:
    """An HTTP or connection failure, from huggingface_hub or the HTTP client under it (httpx or requests)."""
    if isinstance(e, OSError):  # HfHubHTTPError, OfflineModeIsEnabled (a ConnectionError), sockets
        return True
    return any(c.__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3") for c in type(e).__mro__)


def _short(e: BaseException, limit: int = 200) -> str:
    text = one_line(e)
    return text if len(text) <= limit else text[:limit].rstrip() + "..."
