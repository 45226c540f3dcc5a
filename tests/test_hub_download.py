"""Hub models as users name them (`fmc compile ORG/NAME`, `ORG/NAME:FILE.gguf`), downloaded
from a local server on 127.0.0.1 that speaks the hub's file-resolution protocol (the model
listing at /api/models/…, HEAD/GET /REPO/resolve/REVISION/FILE with the commit, ETag, size and
Range) to huggingface_hub, pointed to with HF_ENDPOINT. No test reaches the real hub."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from fmc.cli import main

MODEL = "llama-gqa-untied"
REPO = "tiny-org/tiny-llama"
GGUF_REPO = "tiny-org/tiny-llama-GGUF"
GATED_REPO = "tiny-org/gated-llama"
TOKEN = "hf_fmc_test_token"
MAIN = "a" * 40  # commits: 40 hex digits, as the hub's
V1 = "b" * 40
# Files a build must never fetch: other weight formats and everything else in a repository.
NOT_NEEDED = {"pytorch_model.bin": b"\0" * 4096, "consolidated.safetensors": b"\0" * 2048,
              "README.md": b"# tiny\n", "original/params.json": b"{}"}
DOC = Path(__file__).parent.parent / "docs" / "errors.md"


class FakeHub:
    """Repositories in memory: {repo: {"refs": {name: commit}, "commits": {commit: {file:
    bytes}}, "gated": bool}}. Records every request; cuts the first GET of each file in
    `cut_once` after half its bytes, as a dropped connection does."""

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        self.cut_once: set[str] = set()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def do_GET(self):
                hub.answer(self, body=True)

            def do_HEAD(self):
                hub.answer(self, body=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, repo: str, commits: dict[str, dict[str, bytes]], refs: dict[str, str],
            gated: bool = False) -> None:
        self.repos[repo] = {"refs": refs, "commits": commits, "gated": gated}

    def answer(self, request: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(request.path).path)
        self.requests.append((request.command, path, request.headers.get("Range")))
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if api:
            self._listing(request, api[1], api[2] or "main", body)
        elif resolve:
            self._file(request, *resolve.groups(), body)
        else:
            self._error(request, 404, None)

    def _commit(self, request, repo: str, revision: str) -> str | None:
        entry = self.repos.get(repo)
        if entry is None:
            self._error(request, 404, "RepoNotFound")
            return None
        commit = revision if revision in entry["commits"] else entry["refs"].get(revision)
        if commit is None:
            self._error(request, 404, "RevisionNotFound")
        return commit

    def _listing(self, request, repo: str, revision: str, body: bool) -> None:
        commit = self._commit(request, repo, revision)
        if commit is None:
            return
        files = self.repos[repo]["commits"][commit]
        data = json.dumps({"id": repo, "sha": commit, "gated": self.repos[repo]["gated"] and
                           "manual", "siblings": [{"rfilename": n, "size": len(b)}
                                                  for n, b in files.items()]}).encode()
        request.send_response(200)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        if body:
            request.wfile.write(data)

    def _file(self, request, repo: str, revision: str, name: str, body: bool) -> None:
        commit = self._commit(request, repo, revision)
        if commit is None:
            return
        if self.repos[repo]["gated"]:  # as the hub: 401 without a token, 403 with another
            auth = request.headers.get("Authorization")
            if auth != f"Bearer {TOKEN}":
                self._error(request, 403 if auth else 401, "GatedRepo")
                return
        data = self.repos[repo]["commits"][commit].get(name)
        if data is None:
            self._error(request, 404, "EntryNotFound", commit)
            return
        start = 0
        ranged = re.fullmatch(r"bytes=(\d+)-", request.headers.get("Range") or "")
        if ranged and body:
            start = int(ranged[1])
        request.send_response(206 if start else 200)
        request.send_header("X-Repo-Commit", commit)
        request.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        request.send_header("Accept-Ranges", "bytes")
        request.send_header("Content-Length", str(len(data) - start))
        if start:
            request.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        request.end_headers()
        if not body:
            return
        if name in self.cut_once:  # half the bytes, then the connection drops
            self.cut_once.discard(name)
            request.wfile.write(data[start:len(data) // 2])
            request.wfile.flush()
            request.close_connection = True
            return
        request.wfile.write(data[start:])

    def _error(self, request, status: int, code: str | None, commit: str | None = None):
        request.send_response(status)
        if code:
            request.send_header("X-Error-Code", code)
        if commit:
            request.send_header("X-Repo-Commit", commit)
        request.send_header("Content-Length", "0")
        request.end_headers()


def _sharded(checkpoint: Path) -> dict[str, bytes]:
    """The checkpoint as a hub repository holds it: config, tokenizer files, the weights in two
    safetensors shards with their index — and files a build does not read."""
    from safetensors.numpy import load_file, save

    tensors = load_file(str(checkpoint / "model.safetensors"))
    names = sorted(tensors)
    shards = {f"model-0000{i + 1}-of-00002.safetensors": {n: tensors[n] for n in names[i::2]}
              for i in range(2)}
    files = {name: (checkpoint / name).read_bytes()
             for name in ("config.json", "tokenizer.json", "tokenizer_config.json")}
    files.update({name: save(part) for name, part in shards.items()})
    files["model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": {
        n: shard for shard, part in shards.items() for n in part}}).encode()
    return {**files, **NOT_NEEDED}


@pytest.fixture(scope="module")
def hub(tiny_checkpoint, tmp_path_factory):
    from models import write_gguf_from_checkpoint

    server = FakeHub()
    checkpoint = tiny_checkpoint(MODEL)
    files = _sharded(checkpoint)
    older = {**files, "config.json": json.dumps(
        {**json.loads(files["config.json"]), "max_position_embeddings": 128}).encode()}
    server.add(REPO, {MAIN: files, V1: older}, {"main": MAIN, "v1": V1})
    gguf = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf_from_checkpoint(checkpoint, gguf)
    server.add(GGUF_REPO, {MAIN: {"tiny-f32.gguf": gguf.read_bytes(),
                                  "tiny-other.gguf": b"GGUF" + b"\0" * 64}}, {"main": MAIN})
    server.add(GATED_REPO, {MAIN: files}, {"main": MAIN}, gated=True)
    yield server
    server.server.shutdown()


@pytest.fixture
def hub_env(hub, tmp_path, monkeypatch):
    """This process's huggingface_hub pointed at the fake hub with an empty cache and no
    token (huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE when imported)."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    hub.requests.clear()
    return tmp_path


def _compile(tmp: Path, *args: str) -> list[str]:
    return ["--quiet", "compile", *args, "-o", str(tmp / "out"), "--quant", "q0f32"]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fmc: error: "), err
    return err[0]


# -- the whole path, as a user runs it ----------------------------------------------------------
@pytest.fixture(scope="module")
def downloaded(hub, tmp_path_factory):
    """`fmc compile ORG/NAME` in a fresh process with HF_ENDPOINT and HF_HOME set, the first
    transfer of a shard cut halfway: (process, artifact, HF_HOME, requests made)."""
    home = tmp_path_factory.mktemp("hf-home")
    out = home.parent / (home.name + "-artifact")
    hub.requests.clear()
    hub.cut_once = {"model-00001-of-00002.safetensors"}
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_OFFLINE": "0",
           "CI": "1"}
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE"):
        env.pop(name, None)
    process = subprocess.run(
        [sys.executable, "-m", "fmc", "compile", REPO, "-o", str(out), "--quant", "q0f32",
         "--target", "cpu", "--no-cache"], env=env, capture_output=True, text=True,
        timeout=300)
    return process, out, home, list(hub.requests)


def test_compile_downloads_only_what_the_build_reads(downloaded, hub, capsys):
    process, out, home, requests = downloaded
    assert process.returncode == 0, process.stderr
    fetched = {path.split("/resolve/", 1)[1].split("/", 1)[1]
               for method, path, _ in requests if method == "GET" and "/resolve/" in path}
    assert fetched == {"config.json", "tokenizer.json", "tokenizer_config.json",
                       "model.safetensors.index.json", "model-00001-of-00002.safetensors",
                       "model-00002-of-00002.safetensors"}
    # Pinned: after the listing resolved main, every file is asked for at its commit.
    assert all(f"/resolve/{MAIN}/" in path for _, path, _ in requests if "/resolve/" in path)
    assert f"downloading {REPO} at commit {MAIN[:12]}" in process.stderr
    assert re.search(r"download: [\d.]+ KiB/[\d.]+ KiB \(model-0000\d-of-00002", process.stderr)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == {"kind": "hub", "reference": REPO, "weights": True,
                                  "commit": MAIN}
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    table = re.sub(r"[^\w:/-]", "", capsys.readouterr().out)  # rich may wrap the row
    assert f"hub:{REPO}atcommit{MAIN}" in table


def test_a_cut_transfer_is_retried_in_the_process(downloaded, hub):
    process, _, home, requests = downloaded
    assert process.returncode == 0, process.stderr
    shard = "model-00001-of-00002.safetensors"
    data = hub.repos[REPO]["commits"][MAIN][shard]
    gets = [path for method, path, _ in requests if method == "GET" and path.endswith(shard)]
    assert len(gets) == 2  # cut, then fetched again: under one 10 MiB block, from the start
    cached = home / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / MAIN / shard
    assert cached.read_bytes() == data


def test_a_cut_transfer_resumes_with_a_range_request(hub, hub_env, monkeypatch):
    """huggingface_hub keeps what it received in whole blocks (10 MiB; 16 KiB here, so a tiny
    shard spans several) and asks for the rest with a Range request."""
    import huggingface_hub.constants as constants

    from fmc.frontend import open_model

    block = 16 * 1024
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", block)
    shard = "model-00002-of-00002.safetensors"
    data = hub.repos[REPO]["commits"][MAIN][shard]
    hub.cut_once = {shard}
    source = open_model(REPO)
    kept = len(data) // 2 // block * block
    assert kept > 0
    ranges = [rng for method, path, rng in hub.requests
              if method == "GET" and path.endswith("/" + shard)]
    assert ranges == [None, f"bytes={kept}-"]  # the second asks for the rest only
    assert next(p for p in source.input_files if p.name == shard).read_bytes() == data


def test_the_cache_serves_a_second_resolution_and_offline(downloaded, hub, hub_env,
                                                          monkeypatch):
    import huggingface_hub.constants as constants

    from fmc.frontend import open_model

    _, _, home, _ = downloaded
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    source = open_model(REPO)
    assert source.commit == MAIN
    assert [m for m, path, _ in hub.requests] == ["GET"] and "/api/models/" in \
        hub.requests[0][1]  # the listing only: every file was in the cache
    hub.requests.clear()
    offline = open_model(REPO, offline=True)
    assert offline.commit == MAIN and offline.weights is not None and not hub.requests
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert open_model(REPO).commit == MAIN and not hub.requests


def test_no_network_falls_back_to_the_cache_with_a_warning(downloaded, hub_env, monkeypatch,
                                                           fmc_log):
    import huggingface_hub.constants as constants

    from fmc.frontend import open_model

    _, _, home, _ = downloaded
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", _closed_port_url())
    assert open_model(REPO).commit == MAIN
    assert re.search(r"the hub at http://127\.0\.0\.1:\d+ did not answer \(ConnectError: .*\); "
                     rf"using the cached copy of {REPO} at commit {MAIN}", fmc_log.text)


# -- revisions, GGUF files ------------------------------------------------------------------------
def test_revision_pins_another_commit(hub_env):
    from fmc.frontend import open_model

    source = open_model(REPO, revision="v1")
    assert (source.revision, source.commit) == ("v1", V1)
    assert source.config.context_window == 128  # v1's config, not main's
    assert source.describe()["revision"] == "v1"
    assert open_model(REPO, revision=V1).commit == V1  # a commit names itself


def test_a_gguf_file_is_named_after_a_colon_and_fetched_alone(hub_env, hub):
    from fmc.frontend import open_model

    source = open_model(f"{GGUF_REPO}:tiny-f32.gguf")
    assert source.kind == "hub" and source.commit == MAIN and source.weights is not None
    assert source.input_files[0].name == "tiny-f32.gguf"
    assert {p.rsplit("/", 1)[1] for m, p, _ in hub.requests if m == "GET" and "/resolve/" in p} \
        == {"tiny-f32.gguf"}


def test_a_build_file_names_the_revision_and_a_moved_branch_is_out_of_date(hub_env, hub,
                                                                          monkeypatch):
    from fmc.project.config import BUILD_KEYS
    from fmc.project.runner import compile_options, stamp_key

    assert "revision" in BUILD_KEYS
    assert compile_options({"model": REPO, "output": "o", "revision": "v1"}).revision == "v1"
    build = {"model": REPO, "output": str(hub_env / "out")}
    before = stamp_key(build)
    assert stamp_key(build) == before
    monkeypatch.setitem(hub.repos[REPO]["refs"], "main", V1)  # a push to main
    assert stamp_key(build) != before


def test_revision_needs_a_hub_model(tiny_checkpoint, tmp_path, capsys):
    assert main(["--quiet", "compile", str(tiny_checkpoint(MODEL)), "-o", str(tmp_path / "out"),
                 "--revision", "v1"]) == 2
    assert "--revision applies to a hub model" in _one_error_line(capsys)


# -- errors: one line, a documented exit code ---------------------------------------------------
def _closed_port_url() -> str:
    with socket.socket() as probe:  # a port nothing listens on: the connection is refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _no_network(monkeypatch):
    import huggingface_hub.constants as constants

    url = _closed_port_url()
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        url + "/{repo_id}/resolve/{revision}/{filename}")


def _hub_offline(monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def _writing_fails(code: int, text: str):
    def environment(monkeypatch):
        def http_get(*args, **kwargs):  # where huggingface_hub writes a file's bytes
            raise OSError(code, text)

        monkeypatch.setattr("huggingface_hub.file_download.http_get", http_get)
    return environment


# id → (exit code, message pattern, model argument and options, environment change)
ERRORS = {
    "hub:gated-no-token": (9, rf"hub model '{GATED_REPO}' is gated: accept its conditions at "
                              rf"http://127\.0\.0\.1:\d+/{GATED_REPO}, then set HF_TOKEN",
                           [GATED_REPO], None),
    "hub:gated-token-without-access": (
        9, rf"hub model '{GATED_REPO}' is gated and the token .* has no access to it",
        [GATED_REPO], lambda mp: mp.setenv("HF_TOKEN", "hf_someone_else")),
    "hub:no-such-repo": (4, r"tiny-org/nope: no such file or directory, and no model of that "
                            r"name on the hub at http://127\.0\.0\.1:\d+; if it is private, set "
                            r"HF_TOKEN", ["tiny-org/nope"], None),
    "hub:no-such-revision": (4, rf"hub model '{REPO}' has no revision 'v9' \(--revision\)",
                             [REPO, "--revision", "v9"], None),
    "hub:no-such-file": (4, rf"hub model '{GGUF_REPO}' has no file 'tiny-q4.gguf' at revision "
                            r"main \(its \.gguf files: tiny-f32\.gguf, tiny-other\.gguf\)",
                         [f"{GGUF_REPO}:tiny-q4.gguf"], None),
    "hub:gguf-repo-without-file": (4, rf"hub model '{GGUF_REPO}' holds GGUF files, not a Hugging "
                                      rf"Face checkpoint: name one as {GGUF_REPO}:FILE\.gguf",
                                   [GGUF_REPO], None),
    "hub:no-network": (9, r"cannot reach the hub at http://127\.0\.0\.1:\d+ to download "
                          rf"'{REPO}' \(ConnectError: .*\); check the network or HF_ENDPOINT, or "
                          r"use a cached model with --offline", [REPO], _no_network),
    "hub:cache-full": (6, r"hf/hub: No space left on device while downloading "
                          rf"'{REPO}' into the Hugging Face cache; set HF_HOME \(or "
                          r"HF_HUB_CACHE\) to a writable place with room", [REPO],
                       _writing_fails(errno.ENOSPC, "No space left on device")),
    "hub:cache-not-writable": (6, r"hf/hub: Permission denied while downloading", [REPO],
                               _writing_fails(errno.EACCES, "Permission denied")),
    "hub:offline-not-cached": (4, rf"hub model '{REPO}' is not in the local Hugging Face cache "
                                  r"\(.*\) and --offline", [REPO, "--offline"], None),
    "hub:hf-hub-offline-not-cached": (4, rf"hub model '{REPO}' is not in the local Hugging Face "
                                         r"cache \(.*\) and HF_HUB_OFFLINE is set", [REPO],
                                      _hub_offline),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_hub_errors_are_one_line_with_their_exit_code(case, hub_env, monkeypatch, capsys):
    code, pattern, argv, environment = ERRORS[case]
    if environment is not None:
        environment(monkeypatch)
    capsys.readouterr()
    assert main(_compile(hub_env, *argv)) == code
    line = _one_error_line(capsys)
    assert re.search(pattern, line), line
    assert not (hub_env / "out").exists()


def test_a_gated_model_downloads_with_a_token(hub_env, monkeypatch):
    from fmc.frontend import open_model

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert open_model(GATED_REPO).commit == MAIN


def test_doctor_says_where_hub_models_come_from(hub_env, hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    capsys.readouterr()
    assert main(["doctor", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hub"] == {
        "endpoint": hub.url, "cache": str(hub_env / "hf" / "hub"), "offline": False,
        "token": "HF_TOKEN"}  # its source, never its value


def test_docs_list_every_hub_error_with_its_exit_code():
    rows = re.findall(r"^\| `(hub:[a-z0-9-]+)` \|[^|]*\| (\d+) \|", DOC.read_text(), re.MULTILINE)
    assert {case: int(code) for case, code in rows} == \
        {case: spec[0] for case, spec in ERRORS.items()}


def test_old_manifests_without_a_commit_still_load():
    from fmc.artifacts.manifest import Source

    old = Source.described({"kind": "hub", "reference": REPO, "weights": True})
    assert (old.revision, old.commit, old.extra) == (None, None, {})
    new = Source.described({"kind": "hub", "reference": REPO, "weights": True,
                            "revision": "v1", "commit": V1})
    assert (new.revision, new.commit) == ("v1", V1) and new.to_dict()["commit"] == V1


def test_the_terminal_shows_the_download_in_bytes(monkeypatch):
    import io

    from rich.console import Console

    import fmc.cli.progress as progress_module

    screen = io.StringIO()
    monkeypatch.setattr(progress_module, "stderr", Console(file=screen, force_terminal=True,
                                                           width=120))
    monkeypatch.setattr(progress_module, "interactive", lambda: True)
    with progress_module.CompileProgress() as progress:
        progress("phase", name="import", doc="read the model")
        progress("download", name="model.safetensors", done=512 * 1024, total=2048 * 1024)
        progress._progress.refresh()
        shown = screen.getvalue()
        progress("download", name="model.safetensors", done=2048 * 1024, total=2048 * 1024)
        assert progress._progress.tasks[-1].description == "import: read the model"
    assert "downloading model.safetensors" in shown and "512.0 KiB/2.0 MiB" in shown
