"""Models named by their Hugging Face hub id: `ORG/NAME` (an HF checkpoint) or
`ORG/NAME:FILE.gguf` (one GGUF file of the repository).

huggingface_hub does the transfer (the hub's protocol, tokens, HF_ENDPOINT, the shared cache,
Range retries within a download); fmc decides which files a build reads — config, tokenizer
files and the safetensors shards the index names, or the one GGUF file — so a repository's
other weights (PyTorch `.bin`, consolidated or ONNX copies) are never fetched. Every download
is pinned to the commit the revision resolved to, which goes into the manifest."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from fmc.errors import DownloadError, InputError, OutputError
from fmc.frontend.tokenizer_files import TOKENIZER_FILES

log = logging.getLogger("fmc")

HUB_REFERENCE = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<file>[^:]+\.gguf))?")
DEFAULT_REVISION = "main"
# Errors writing the Hugging Face cache: the user's disk or permissions, not the download.
CACHE_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}

# progress("download", name=FILE, done=BYTES, total=BYTES): the bytes of this resolution.
Progress = Callable[..., None]


@dataclass(frozen=True)
class HubModel:
    """A resolved hub reference: the local copy of what a build reads, at one commit."""

    repo_id: str
    path: Path  # the snapshot directory (an HF checkpoint) or the GGUF file in it
    commit: str  # the commit the revision resolved to


def settings() -> dict[str, Any]:
    """Where hub ids are downloaded from and to, as huggingface_hub resolved its environment
    (for `fmc doctor`). The token is reported by its source only, and without asking the
    hub or an OIDC exchange."""
    from huggingface_hub import constants

    token = next((name for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
                  if os.environ.get(name)), None)
    if token is None and Path(constants.HF_TOKEN_PATH).is_file():
        token = constants.HF_TOKEN_PATH
    return {"endpoint": constants.ENDPOINT, "cache": constants.HF_HUB_CACHE,
            "offline": constants.is_offline_mode(), "token": token}


def parse_reference(reference: str) -> tuple[str, str | None] | None:
    """(repo id, GGUF file or None) for `ORG/NAME[:FILE.gguf]`, else None."""
    match = HUB_REFERENCE.fullmatch(reference)
    return (match["repo"], match["file"]) if match else None


def resolve(reference: str, revision: str | None = None, offline: bool = False,
            progress: Progress | None = None) -> HubModel:
    """Download what a build of `reference` reads into the Hugging Face cache (files already
    there are not fetched again) and return where it is. Offline (`offline`, or
    HF_HUB_OFFLINE=1), only the cache is looked at, as when the hub cannot be reached."""
    from huggingface_hub import constants

    repo_id, gguf_file = parse_reference(reference)
    if offline or constants.is_offline_mode():
        cached = _cached(repo_id, gguf_file, revision)
        if cached is None:
            why = "--offline" if offline else "HF_HUB_OFFLINE is set"
            raise InputError(
                f"hub model {_named(reference, revision)} is not in the local Hugging Face "
                f"cache ({constants.HF_HUB_CACHE}) and {why}: run without it to download it")
        return cached
    hub = _Hub(repo_id, revision, progress or (lambda *args, **kwargs: None))
    try:
        with hub.translated_errors():
            commit, sizes = hub.listing()
    except _Unreachable as unreachable:  # as huggingface_hub does: the cache, if it can serve
        cached = _cached(repo_id, gguf_file, revision)
        if cached is None:
            raise
        log.warning("the hub at %s did not answer (%s); using the cached copy of %s at commit "
                    "%s", hub.endpoint, unreachable.cause, repo_id, cached.commit)
        return cached
    with hub.translated_errors():
        if gguf_file is not None:
            if gguf_file not in sizes:
                raise InputError(f"hub model {repo_id!r} has no file {gguf_file!r} at revision "
                                 f"{hub.revision_name}{_listing_hint(sizes, '.gguf')}")
            path = hub.fetch(commit, [gguf_file], sizes)[0]
        else:
            files = _checkpoint_files(  # the index, small, says which shards to fetch
                repo_id, sizes, lambda name: hub.fetch(commit, [name], sizes, announce=False)[0])
            path = hub.fetch(commit, files, sizes)[0].parent
        _remember_ref(repo_id, hub.revision_name, commit)
    return HubModel(repo_id, path, commit)


def _remember_ref(repo_id: str, revision: str, commit: str) -> None:
    """Record in the cache that `revision` (a branch or tag) is at `commit`, as huggingface_hub
    does for the downloads it resolves itself: fmc fetches by commit, and an offline run finds
    the branch through this file. Written last, so it names only complete downloads."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    if revision == commit:
        return
    ref = Path(constants.HF_HUB_CACHE, repo_folder_name(repo_id=repo_id, repo_type="model"),
               "refs", *revision.split("/"))
    if ref.is_file() and ref.read_text() == commit:
        return
    ref.parent.mkdir(parents=True, exist_ok=True)
    temporary = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
    temporary.write_text(commit)
    os.replace(temporary, ref)


def _named(reference: str, revision: str | None) -> str:
    return repr(reference) + (f" at revision {revision!r}" if revision else "")


def _listing_hint(sizes: dict[str, int | None], suffix: str) -> str:
    names = sorted(n for n in sizes if n.endswith(suffix))
    if not names:
        return f" (it holds no {suffix} file)"
    return f" (its {suffix} files: {', '.join(names[:8])}{' …' if len(names) > 8 else ''})"


def _checkpoint_files(repo_id: str, sizes: dict[str, int | None],
                      fetch: Callable[[str], Path]) -> list[str]:
    """What the HF-directory reader opens, chosen from the repository's file list: config,
    tokenizer files, and the shards of the index (else every top-level .safetensors file)."""
    if "config.json" not in sizes:
        if any(name.endswith(".gguf") for name in sizes):
            raise InputError(f"hub model {repo_id!r} holds GGUF files, not a Hugging Face "
                             f"checkpoint: name one as {repo_id}:FILE.gguf"
                             f"{_listing_hint(sizes, '.gguf')}")
        raise InputError(f"hub model {repo_id!r} has no config.json: not a Hugging Face "
                         "checkpoint or GGUF repository")
    from fmc.frontend.hf_dir import INDEX_FILE, read_json  # numpy: not for `fmc doctor`

    files = ["config.json", *(name for name in TOKENIZER_FILES if name in sizes)]
    if INDEX_FILE in sizes:
        index_path = fetch(INDEX_FILE)
        index = read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"{index_path}: 'weight_map' is missing or empty")
        shards = sorted(set(map(str, weight_map.values())))
        absent = [name for name in shards if name not in sizes]
        if absent:
            raise InputError(f"{index_path}: names shard {absent[0]!r}, which hub model "
                             f"{repo_id!r} does not hold")
        return [*files, INDEX_FILE, *shards]
    shards = sorted(n for n in sizes if n.endswith(".safetensors") and "/" not in n)
    if not shards:
        other = sorted(n for n in sizes if n.endswith((".bin", ".pt", ".pth")))
        hint = f" (found {other[0]}: fmc reads safetensors or GGUF)" if other else ""
        raise InputError(f"hub model {repo_id!r} has no *.safetensors weights{hint}")
    return [*files, *shards]


def _cached(repo_id: str, gguf_file: str | None, revision: str | None) -> HubModel | None:
    """The cache's copy at `revision` (a branch or tag through its recorded ref, or a commit),
    or None. A partial copy is returned as found; the reader then names the missing file."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, gguf_file or "config.json",
                                   revision=revision or DEFAULT_REVISION)
    if not isinstance(found, str):  # None, or the marker of a file known to be absent
        return None
    path = Path(found)
    snapshot = path.parents[len(Path(gguf_file).parts) - 1] if gguf_file else path.parent
    return HubModel(repo_id, path if gguf_file else snapshot, snapshot.name)


class _Unreachable(DownloadError):
    """No answer from the hub, or a failing one (5xx): the cache may still serve."""

    def __init__(self, message: str, cause: str):
        super().__init__(message)
        self.cause = cause


class _Hub:
    """One resolution's requests: the listing, then each file, with errors translated."""

    def __init__(self, repo_id: str, revision: str | None, progress: Progress):
        from huggingface_hub import constants

        self.repo_id, self.revision, self.progress = repo_id, revision, progress
        self.endpoint = constants.ENDPOINT
        self.revision_name = revision or DEFAULT_REVISION

    def listing(self) -> tuple[str, dict[str, int | None]]:
        """(commit, {file: size or None}) of the revision."""
        from huggingface_hub import HfApi

        info = HfApi().model_info(self.repo_id, revision=self.revision, files_metadata=True)
        if not info.sha:
            raise DownloadError(f"the hub at {self.endpoint} did not say which commit "
                                f"{self.repo_id!r} is at (no 'sha' in its answer)")
        return info.sha, {s.rfilename: s.lfs.size if s.lfs else s.size
                          for s in info.siblings or []}

    def fetch(self, commit: str, names: list[str], sizes: dict[str, int | None],
              announce: bool = True) -> list[Path]:
        """Each file's path in the cache, downloading those not there yet (one progress
        count over all of them)."""
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        missing = [n for n in names
                   if not isinstance(try_to_load_from_cache(self.repo_id, n, revision=commit),
                                     str)]
        total = sum(sizes.get(n) or 0 for n in missing)
        if missing and announce:
            log.info("downloading %s at commit %s: %d file(s), %.1f MB", self.repo_id,
                     commit[:12], len(missing), total / 1e6)
        done = 0
        paths = []
        for name in names:
            bar = _progress_bar(lambda n, name=name, base=done: self.progress(
                "download", name=name, done=base + n, total=total))
            with _quiet_library_logs():
                paths.append(Path(hf_hub_download(self.repo_id, name, revision=commit,
                                                  tqdm_class=bar)))
            if name in missing:
                done += sizes.get(name) or paths[-1].stat().st_size
        return paths

    @contextlib.contextmanager
    def translated_errors(self) -> Iterator[None]:
        """huggingface_hub's and the HTTP client's exceptions → one-line fmc errors."""
        import httpx2  # huggingface_hub's HTTP client
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RemoteEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        try:
            yield
        except GatedRepoError:
            raise DownloadError(self._gated()) from None
        except RepositoryNotFoundError:
            private = "" if _token() else "; if it is private, set HF_TOKEN"
            raise InputError(f"{self.repo_id}: no such file or directory, and no model of that "
                             f"name on the hub at {self.endpoint}{private}") from None
        except RevisionNotFoundError:
            raise InputError(f"hub model {self.repo_id!r} has no revision "
                             f"{self.revision_name!r} (--revision)") from None
        except RemoteEntryNotFoundError as exc:
            url = str(exc.response.url) if exc.response is not None else "?"
            name = unquote(url.split("/resolve/", 1)[-1].split("/", 1)[-1])
            raise InputError(f"hub model {self.repo_id!r} has no file {name!r} at revision "
                             f"{self.revision_name}") from None
        except HfHubHTTPError as exc:
            raise self._http(exc) from None
        except httpx2.TransportError as exc:
            raise self._unreachable(exc) from None
        except LocalEntryNotFoundError as exc:  # a file's HEAD request failed, nothing cached
            cause = exc.__cause__
            if isinstance(cause, HfHubHTTPError):
                raise self._http(cause) from None
            raise self._unreachable(cause or exc) from None
        except OSError as exc:
            if exc.errno in CACHE_WRITE_ERRORS:
                from huggingface_hub import constants

                raise OutputError(
                    f"{constants.HF_HUB_CACHE}: {exc.strerror or _first_line(exc)} while "
                    f"downloading {self.repo_id!r} into the Hugging Face cache; set HF_HOME "
                    "(or HF_HUB_CACHE) to a writable place with room") from None
            if "Consistency check failed" not in str(exc):  # huggingface_hub's size check
                raise
            raise DownloadError(f"downloading {self.repo_id!r} from {self.endpoint} failed: "
                                f"{_first_line(exc)}") from None

    def _gated(self) -> str:
        page = f"{self.endpoint}/{self.repo_id}"
        if _token():
            return (f"hub model {self.repo_id!r} is gated and the token (HF_TOKEN or `hf auth "
                    f"login`) has no access to it: accept its conditions at {page} with that "
                    "account")
        return (f"hub model {self.repo_id!r} is gated: accept its conditions at {page}, then "
                "set HF_TOKEN to an access token of that account (or run `hf auth login`)")

    def _http(self, exc: Any) -> DownloadError:
        code = exc.response.status_code if exc.response is not None else 0
        if code in (401, 403):
            return DownloadError(f"the hub at {self.endpoint} refused access to "
                                 f"{self.repo_id!r} (HTTP {code}); check HF_TOKEN")
        return _Unreachable(f"the hub at {self.endpoint} failed on {self.repo_id!r} "
                            f"(HTTP {code})", f"HTTP {code}")

    def _unreachable(self, exc: BaseException) -> _Unreachable:
        cause = f"{type(exc).__name__}: {_first_line(exc)}"
        return _Unreachable(f"cannot reach the hub at {self.endpoint} to download "
                            f"{self.repo_id!r} ({cause}); check the network or HF_ENDPOINT, or "
                            "use a cached model with --offline", cause)


def _token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no detail"


@contextlib.contextmanager
def _quiet_library_logs() -> Iterator[None]:
    """huggingface_hub logs multi-line warnings (a retried transfer); fmc reports
    through its own logger and errors, so they would break `--quiet` and one-line errors."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _progress_bar(report: Callable[[int], None]) -> type:
    """A tqdm stand-in for huggingface_hub's `tqdm_class`: counts one file's bytes (the
    retry after a cut transfer starts from what was kept) and forwards them to `report`."""

    class Bar:
        def __init__(self, *args: Any, initial: int = 0, **kwargs: Any):
            self.n = initial
            report(self.n)

        def update(self, n: int | float | None = 1) -> None:
            self.n += int(n or 0)
            report(self.n)

        def __enter__(self) -> Bar:
            return self

        def __exit__(self, *exc: Any) -> None:
            pass

        def close(self) -> None:
            pass

        def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:
            pass

        def refresh(self, *args: Any, **kwargs: Any) -> None:
            pass

    return Bar
