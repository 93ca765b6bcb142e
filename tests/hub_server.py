"""A local Hugging Face Hub for tests: the endpoints the real `huggingface_hub` client and transformers use.

No installable Hub-compatible server supports uploads (olah is a read-only mirror, the hf-local-hub wheel lacks its
binary, KohakuHub is on no registry), so this stdlib `ThreadingHTTPServer` speaks the Hub's HTTP API on 127.0.0.1
(ephemeral port, served from a background thread) and keeps its content in a temporary directory: blobs under
`blobs/<sha256>`, repository metadata (commits, branches) in memory.

Use: `hub = LocalHub(tmp_path).start()`, then `point_clients_at(monkeypatch, hub.url, hf_home)` so that
huggingface_hub and transformers (already imported or not) talk to it; at teardown `close_session()`, then
`hub.stop()`. The `local_hub` fixture of `test_hub.py` does exactly this.

Implemented, following the protocol the client in huggingface_hub 2.4 expects:

- `POST /api/repos/create`: model, dataset and space repos; a bare name goes to the namespace of the one user
  (`USER`); the first commit adds the default `.gitattributes` (as the Hub does); an existing repo answers 409 with
  its `url` in the body (what `exist_ok=True` reads).
- `POST /api/validate-yaml`: parses the README front matter; 400 with `errors` for invalid YAML or wrongly typed
  `tags` / `library_name` / `license` / `base_model`, a warning for a card without metadata.
- `POST /api/{type}s/{repo}/preupload/{rev}`: `uploadMode` is "lfs" for files of 10 MiB or more, files matching a
  `filter=lfs` pattern of the revision's `.gitattributes`, or binary samples (a NUL byte); `oid` is the git blob sha1
  (regular) or the sha256 (LFS) of the current version, which lets the client skip unchanged files.
- LFS basic transfer: `POST /{repo}.git/info/lfs/objects/batch` (objects already stored in the repo get no
  `actions`), `PUT` of the content to the returned href (sha256 and size checked, `Content-Length` required), `POST`
  verify.
- `POST /api/{type}s/{repo}/commit/{rev}` with the NDJSON body (`header`, `file`, `lfsFile`, `deletedFile`,
  `deletedFolder`): every commit gets a new 40-hex sha; `parentCommit` is checked (412); an LFS pointer to content
  never uploaded is refused (400); deleting a missing file is a 404 EntryNotFound.
- `GET /api/{type}s/{repo}[/revision/{rev}]`: sha, siblings (sizes, blob ids and LFS info with `blobs=true`),
  `cardData`, tags and `library_name` from the README metadata.
- `GET /api/{type}s/{repo}/tree/{rev}[/{path}]`: `recursive`, cursor pagination through a `Link` header.
- `HEAD`/`GET /{repo}/resolve/{rev}/{path}`: `X-Repo-Commit`, `ETag` (git blob sha1; of the pointer file for LFS),
  `X-Linked-Etag` and `X-Linked-Size` for LFS files, single-range `Range` requests (206/416).
- Revisions: branch names (`main`) and full commit shas; errors are 404 with `X-Error-Code` `RepoNotFound`,
  `RevisionNotFound` or `EntryNotFound` (the latter with `X-Repo-Commit`, which the client caches as "no such file").
- Writes (create, preupload, LFS batch, commit) need an `Authorization: Bearer` header (401 otherwise); any token is
  accepted.

Not implemented: Xet storage (tests set `HF_HUB_DISABLE_XET`), multipart LFS uploads, branches other than `main`
(create_branch), tags, pull requests (`create_pr` is refused with 400), repo deletion/moves/settings, `.gitignore`
(`shouldIgnore` is always false), `paths-info`, `expand=true` details (`lastCommit`, security status), access
control (private repos are readable by anyone), short commit shas, and redirects of LFS downloads to a CDN (LFS
content is served directly, with the same headers the Hub puts on its redirect).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import logging
import re
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest
import yaml

logger = logging.getLogger(__name__)

USER = "swsc-tester"
DUMMY_TOKEN = "hf_local_test_token"
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
TREE_PAGE_SIZE = 1000
_IO_CHUNK = 1 << 20

DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gguf", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
        "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle",
        "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite",
        "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
    )
)  # fmt: skip

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_NAME = r"[\w.\-]+"
_REPO_ID = re.compile(rf"^{_NAME}(/{_NAME})?$")
_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")


class HubError(Exception):
    """An HTTP error answer, with the Hub's `X-Error-Code` where the client dispatches on it."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.commit = commit


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class Entry:
    """One file of a commit: content-addressed blob plus how git stores it (regular blob or LFS pointer)."""

    sha256: str
    size: int
    lfs: bool
    git_oid: str

    @property
    def upload_oid(self) -> str:
        """What preupload reports as `oid`: the client compares it with sha256 (LFS) or the git sha1 (regular)."""
        return self.sha256 if self.lfs else self.git_oid


@dataclass(frozen=True)
class Commit:
    oid: str
    parent: str | None
    files: dict[str, Entry]
    title: str
    date: str


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    lfs_objects: set[str] = field(default_factory=set)

    def resolve(self, revision: str) -> Commit:
        """The commit a branch name or a full commit sha points to, or 404 RevisionNotFound."""
        oid = self.branches.get(revision) or (revision if revision in self.commits else None)
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[oid]


class HubStore:
    """Repositories and blobs of the local Hub; handlers run in threads and hold `lock` around repo accesses."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}
        self._commit_counter = 0

    # -- blobs --------------------------------------------------------------------------------------------------
    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256

    def put_bytes(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        path = self.blob_path(sha256)
        if not path.exists():
            tmp = path.with_suffix(f".{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        return sha256

    def put_stream(self, chunks: Iterator[bytes], expected_sha256: str, expected_size: int) -> None:
        """Store an uploaded LFS object, refusing content whose hash or size differs from what the batch announced."""
        digest = hashlib.sha256()
        size = 0
        tmp = self.root / "blobs" / f"upload-{threading.get_ident()}.tmp"
        with tmp.open("wb") as f:
            for chunk in chunks:
                digest.update(chunk)
                size += len(chunk)
                f.write(chunk)
        if digest.hexdigest() != expected_sha256 or size != expected_size:
            tmp.unlink()
            raise HubError(400, f"Uploaded content does not match oid {expected_sha256} / size {expected_size}")
        tmp.replace(self.blob_path(expected_sha256))

    def regular_entry(self, data: bytes) -> Entry:
        return Entry(self.put_bytes(data), len(data), False, _git_blob_sha1(data))

    def lfs_entry(self, sha256: str) -> Entry:
        size = self.blob_path(sha256).stat().st_size
        return Entry(sha256, size, True, _git_blob_sha1(_lfs_pointer(sha256, size)))

    # -- repos and commits ----------------------------------------------------------------------------------------
    def get_repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                raise HubError(409, f"You already created this {repo_type} repo")
            repo = Repo(repo_type, repo_id, private, _now())
            self.repos[(repo_type, repo_id)] = repo
            files = {".gitattributes": self.regular_entry(DEFAULT_GITATTRIBUTES.encode())}
            self.add_commit(repo, "main", files, "initial commit")
            return repo

    def add_commit(self, repo: Repo, branch: str, files: dict[str, Entry], title: str) -> Commit:
        """Record a new commit on `branch`; the sha is unique per commit even when the tree does not change."""
        with self.lock:
            self._commit_counter += 1
            parent = repo.branches.get(branch)
            seed = json.dumps([self._commit_counter, parent, title, sorted((p, e.git_oid) for p, e in files.items())])
            commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, dict(files), title, _now())
            repo.commits[commit.oid] = commit
            repo.branches[branch] = commit.oid
            return commit


def _lfs_patterns(commit: Commit, store: HubStore) -> list[str]:
    entry = commit.files.get(".gitattributes")
    if entry is None:
        return []
    patterns = []
    for line in store.blob_path(entry.sha256).read_text().splitlines():
        parts = line.split()
        if len(parts) > 1 and "filter=lfs" in parts[1:]:
            patterns.append(parts[0])
    return patterns


def _matches_any(path: str, patterns: list[str]) -> bool:
    name = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(path if "/" in pattern else name, pattern) for pattern in patterns)


def _card_metadata(commit: Commit, store: HubStore) -> dict[str, Any] | None:
    entry = commit.files.get("README.md")
    if entry is None:
        return None
    try:
        return _front_matter(store.blob_path(entry.sha256).read_text())
    except (ValueError, TypeError):
        return None


def _front_matter(content: str) -> dict[str, Any] | None:
    """The YAML metadata block of a card (None when there is none); ValueError/TypeError when it is invalid."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
    if match is None:
        return None
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as err:
        raise ValueError(f"Invalid YAML in the metadata block: {err}") from err
    if data is None:
        return None
    if not isinstance(data, dict):
        raise TypeError("The metadata block must be a YAML mapping")
    return data


def _metadata_errors(data: dict[str, Any]) -> list[str]:
    errors = []
    for key in ("library_name", "license", "pipeline_tag"):
        if key in data and not isinstance(data[key], str):
            errors.append(f'"{key}" must be a string')
    if "tags" in data and not (isinstance(data["tags"], list) and all(isinstance(t, str) for t in data["tags"])):
        errors.append('"tags" must be an array of strings')
    if "base_model" in data:
        base = data["base_model"]
        bases = base if isinstance(base, list) else [base]
        if not all(isinstance(b, str) and _REPO_ID.match(b) for b in bases):
            errors.append('"base_model" must be a repo id or a list of repo ids')
    return errors


class _Handler(BaseHTTPRequestHandler):
    """Routes one request to one of the endpoint methods below; HubError becomes the Hub's JSON error answer."""

    protocol_version = "HTTP/1.1"
    server: LocalHubServer

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("local hub: " + format, *args)

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # -- plumbing -------------------------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        self._body_consumed = False
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        with self.server.store.lock:
            self.server.requests.append((method, url.path))
        try:
            for route_method, pattern, handler in _ROUTES:
                match = pattern.match(url.path)
                if match and (route_method == method or (route_method == "GET" and method == "HEAD")):
                    handler(self, *match.groups())
                    return
            raise HubError(404, f"Not found: {method} {url.path}")
        except HubError as err:
            self._send_error(err)
        except Exception as err:  # a bug of this server: answer 500 rather than dropping the connection
            logger.exception("local hub failed on %s %s", method, url.path)
            self._send_error(HubError(500, f"{type(err).__name__}: {err}"))

    def _send_error(self, err: HubError) -> None:
        if not self._body_consumed and self.command in ("POST", "PUT"):
            self.close_connection = True  # the unread body would be parsed as the next request
        headers = {"X-Error-Message": err.message}
        if err.code:
            headers["X-Error-Code"] = err.code
        if err.commit:
            headers["X-Repo-Commit"] = err.commit
        self._send_json({"error": err.message}, status=err.status, headers=headers)

    def _send(self, status: int, body: bytes, headers: dict[str, str], content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers or {}, "application/json; charset=utf-8")

    def _body_chunks(self) -> Iterator[bytes]:
        """The request body piece by piece; like S3 behind the Hub, a body needs a `Content-Length`."""
        if "Content-Length" not in self.headers and self.headers.get("Transfer-Encoding"):
            raise HubError(411, "Length Required: send a Content-Length")
        yield from self._read_exact(int(self.headers.get("Content-Length") or 0))
        self._body_consumed = True

    def _read_exact(self, size: int) -> Iterator[bytes]:
        while size > 0:
            chunk = self.rfile.read(min(size, _IO_CHUNK))
            if not chunk:
                raise HubError(400, "Truncated request body")
            size -= len(chunk)
            yield chunk

    def _body(self) -> bytes:
        return b"".join(self._body_chunks())

    def _json_body(self) -> Any:
        try:
            return json.loads(self._body() or b"null")
        except json.JSONDecodeError as err:
            raise HubError(400, f"Invalid JSON body: {err}") from err

    def _require_token(self) -> None:
        if not self.headers.get("Authorization", "").startswith("Bearer "):
            self._body()
            raise HubError(401, "Authentication required: pass a token (any value works on the local hub)")

    def _repo(self, type_segment: str, namespace: str, name: str) -> Repo:
        return self.server.store.get_repo(REPO_TYPES[type_segment], f"{namespace}/{name}")

    def _repo_url(self, repo: Repo) -> str:
        return f"{self.server.url}/{URL_PREFIXES[repo.repo_type]}{repo.repo_id}"

    # -- endpoints ------------------------------------------------------------------------------------------------
    def create_repo(self) -> None:
        self._require_token()
        body = self._json_body() or {}
        name, organization = body.get("name"), body.get("organization") or USER
        repo_type = body.get("type") or "model"
        repo_id = f"{organization}/{name}"
        if repo_type not in URL_PREFIXES or not isinstance(name, str) or not _REPO_ID.match(repo_id):
            raise HubError(400, f"Invalid repo name or type: {repo_id!r} ({repo_type})")
        private = bool(body.get("private")) or body.get("visibility") == "private"
        store = self.server.store
        try:
            repo = store.create_repo(repo_type, repo_id, private)
        except HubError as err:
            existing = store.get_repo(repo_type, repo_id)
            self._send_json({"error": err.message, "url": self._repo_url(existing)}, status=err.status)
            return
        self._send_json({"url": self._repo_url(repo), "name": repo_id, "id": repo_id})

    def validate_yaml(self) -> None:
        body = self._json_body() or {}
        try:
            metadata = _front_matter(body.get("content", ""))
        except (ValueError, TypeError) as err:
            raise HubError(400, str(err)) from err
        if metadata is None:
            self._send_json({"errors": [], "warnings": [{"message": "Empty or missing yaml metadata in repo card"}]})
            return
        errors = _metadata_errors(metadata)
        status = 400 if errors else 200
        self._send_json({"errors": [{"message": e} for e in errors], "warnings": []}, status=status)

    def repo_info(self, type_segment: str, namespace: str, name: str, revision: str | None) -> None:
        store = self.server.store
        with store.lock:
            repo = self._repo(type_segment, namespace, name)
            commit = repo.resolve(unquote(revision or "main"))
        metadata = _card_metadata(commit, store) or {}
        with_blobs = self.query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path, entry in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=entry.size, blobId=entry.git_oid)
                if entry.lfs:
                    sibling["lfs"] = {"sha256": entry.sha256, "size": entry.size, "pointerSize": len(_pointer(entry))}
            siblings.append(sibling)
        tags = metadata.get("tags") or []
        library = metadata.get("library_name")
        self._send_json(
            {
                "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": commit.oid,
                "lastModified": commit.date,
                "createdAt": repo.created_at,
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "library_name": library,
                "tags": list(tags) + ([library] if library and library not in tags else []),
                "cardData": metadata or None,
                "siblings": siblings,
                "usedStorage": sum(e.size for e in commit.files.values()),
            }
        )

    def tree(self, type_segment: str, namespace: str, name: str, revision: str, path: str | None) -> None:
        with self.server.store.lock:
            commit = self._repo(type_segment, namespace, name).resolve(unquote(revision))
        prefix = unquote(path).strip("/") if path else ""
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        under = {p: e for p, e in commit.files.items() if not prefix or p.startswith(prefix + "/")}
        if prefix and not under:
            raise HubError(404, f"{prefix} does not exist on {revision}", "EntryNotFound", commit.oid)
        entries: dict[str, dict[str, Any]] = {}
        start = len(prefix) + 1 if prefix else 0
        for file_path, entry in under.items():
            parts = file_path[start:].split("/")
            depth = len(parts) if recursive else 1
            for i in range(1, min(depth, len(parts) - 1) + 1):
                folder = file_path[:start] + "/".join(parts[:i])
                entries[folder] = {"type": "directory", "path": folder, "size": 0, "oid": _folder_oid(commit, folder)}
            if recursive or len(parts) == 1:
                item: dict[str, Any] = {"type": "file", "path": file_path, "size": entry.size, "oid": entry.git_oid}
                if entry.lfs:
                    item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": len(_pointer(entry))}
                entries[file_path] = item
        listing = [entries[p] for p in sorted(entries)]
        cursor = int(self.query.get("cursor", 0))
        page = listing[cursor : cursor + TREE_PAGE_SIZE]
        headers = {}
        if cursor + TREE_PAGE_SIZE < len(listing):
            query = dict(self.query, cursor=str(cursor + TREE_PAGE_SIZE))
            next_url = f"{self.server.url}{urlsplit(self.path).path}?" + "&".join(
                f"{k}={quote(v, safe='')}" for k, v in query.items()
            )
            headers["Link"] = f'<{next_url}>; rel="next"'
        self._send_json(page, headers=headers)

    def preupload(self, type_segment: str, namespace: str, name: str, revision: str) -> None:
        self._require_token()
        body = self._json_body() or {}
        store = self.server.store
        if self.query.get("create_pr"):
            raise HubError(400, "Pull requests are not supported by the local hub")
        with store.lock:
            commit = self._repo(type_segment, namespace, name).resolve(unquote(revision))
        patterns = _lfs_patterns(commit, store)
        files = []
        for item in body.get("files", []):
            path, size = item["path"], int(item["size"])
            sample = base64.b64decode(item.get("sample", ""))
            lfs = size >= LFS_SIZE_THRESHOLD or _matches_any(path, patterns) or b"\0" in sample
            current = commit.files.get(path)
            files.append(
                {
                    "path": path,
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": current.upload_oid if current is not None and current.lfs == lfs else None,
                }
            )
        self._send_json({"files": files, "commitOid": commit.oid})

    def lfs_batch(self, prefix: str | None, namespace: str, name: str) -> None:
        self._require_token()
        body = self._json_body() or {}
        repo_type = REPO_TYPES[prefix.rstrip("/")] if prefix else "model"
        with self.server.store.lock:
            repo = self.server.store.get_repo(repo_type, f"{namespace}/{name}")
            known = set(repo.lfs_objects)
        if body.get("operation") != "upload":
            raise HubError(400, "Only the LFS 'upload' operation is supported by the local hub")
        base = f"{self.server.url}/{URL_PREFIXES[repo_type]}{repo.repo_id}.git/info/lfs/objects"
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            answer: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if not re.fullmatch(r"[0-9a-f]{64}", oid):
                answer["error"] = {"code": 422, "message": "oid must be a sha256"}
            elif oid not in known:
                answer["actions"] = {
                    "upload": {"href": f"{base}/{oid}/{size}"},
                    "verify": {"href": f"{base}/{oid}/{size}/verify"},
                }
            objects.append(answer)
        self._send(
            200, json.dumps({"transfer": "basic", "objects": objects}).encode(), {}, "application/vnd.git-lfs+json"
        )

    def lfs_upload(self, prefix: str | None, namespace: str, name: str, oid: str, size: str) -> None:
        store = self.server.store
        repo_type = REPO_TYPES[prefix.rstrip("/")] if prefix else "model"
        with store.lock:
            repo = store.get_repo(repo_type, f"{namespace}/{name}")
        store.put_stream(self._body_chunks(), oid, int(size))
        with store.lock:
            repo.lfs_objects.add(oid)
        self._send(200, b"", {}, "text/plain")

    def lfs_verify(self, prefix: str | None, namespace: str, name: str, oid: str, size: str) -> None:
        store = self.server.store
        body = self._json_body() or {}
        repo_type = REPO_TYPES[prefix.rstrip("/")] if prefix else "model"
        with store.lock:
            repo = store.get_repo(repo_type, f"{namespace}/{name}")
            stored = oid in repo.lfs_objects and store.blob_path(oid).stat().st_size == int(size)
        if not stored or body.get("oid") != oid:
            raise HubError(404, f"LFS object {oid} was not uploaded")
        self._send_json({"success": True})

    def commit(self, type_segment: str, namespace: str, name: str, revision: str) -> None:
        self._require_token()
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        store = self.server.store
        if self.query.get("create_pr"):
            raise HubError(400, "Pull requests are not supported by the local hub")
        branch = unquote(revision)
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first NDJSON line must be the commit header")
        header = lines[0]["value"]
        with store.lock:
            repo = self._repo(type_segment, namespace, name)
            if branch not in repo.branches:
                if _COMMIT_SHA.match(branch):
                    raise HubError(400, "Commits go to a branch, not to a commit sha")
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            head = repo.commits[repo.branches[branch]]
            parent = header.get("parentCommit")
            if parent is not None and parent != head.oid:
                raise HubError(412, f"A commit has happened since {parent}: {branch} is at {head.oid}")
            files = dict(head.files)
            for line in lines[1:]:
                _apply_operation(store, repo, files, line["key"], line["value"], head.oid)
            commit = store.add_commit(repo, branch, files, header.get("summary") or "")
        self._send_json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self._repo_url(repo)}/commit/{commit.oid}",
                "hookOutput": "",
            }
        )

    def resolve(self, prefix: str | None, namespace: str, name: str, revision: str, path: str) -> None:
        store = self.server.store
        repo_type = REPO_TYPES[prefix.rstrip("/")] if prefix else "model"
        with store.lock:
            commit = store.get_repo(repo_type, f"{namespace}/{name}").resolve(unquote(revision))
        file_path = unquote(path)
        entry = commit.files.get(file_path)
        if entry is None:
            raise HubError(404, f"Entry not found: {file_path}", "EntryNotFound", commit.oid)
        headers = {
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{entry.git_oid}"',
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{file_path.rsplit("/", 1)[-1]}"',
        }
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
        start, stop, status = 0, entry.size, 200
        range_header = self.headers.get("Range")
        if range_header:
            start, stop = _parse_range(range_header, entry.size, commit.oid)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{entry.size}"
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(stop - start))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        with store.blob_path(entry.sha256).open("rb") as f:
            f.seek(start)
            remaining = stop - start
            while remaining:
                chunk = f.read(min(remaining, _IO_CHUNK))
                self.wfile.write(chunk)
                remaining -= len(chunk)


def _pointer(entry: Entry) -> bytes:
    return _lfs_pointer(entry.sha256, entry.size)


def _folder_oid(commit: Commit, folder: str) -> str:
    content = sorted((p, e.git_oid) for p, e in commit.files.items() if p.startswith(folder + "/"))
    return hashlib.sha1(json.dumps(content).encode()).hexdigest()


def _parse_range(header: str, size: int, commit_oid: str) -> tuple[int, int]:
    """Start and stop (exclusive) of a single `bytes=` range; 416 when it cannot be satisfied."""
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if match is None or match.groups() == ("", ""):
        raise HubError(416, f"Unsupported Range header: {header}", commit=commit_oid)
    first, last = match.groups()
    if first == "":
        start, stop = max(size - int(last), 0), size
    else:
        start, stop = int(first), min(int(last) + 1, size) if last else size
    if start >= size or start >= stop:
        raise HubError(416, f"Range {header} not satisfiable for {size} bytes", commit=commit_oid)
    return start, stop


def _apply_operation(
    store: HubStore, repo: Repo, files: dict[str, Entry], key: str, value: dict[str, Any], head_oid: str
) -> None:
    """Apply one NDJSON commit operation to the file map of the commit being built."""
    path = value.get("path", "")
    if key == "file":
        if value.get("encoding", "base64") != "base64":
            raise HubError(400, f"Unsupported encoding {value.get('encoding')!r} for {path}")
        files[path] = store.regular_entry(base64.b64decode(value["content"]))
    elif key == "lfsFile":
        oid = value["oid"]
        if oid not in repo.lfs_objects:
            raise HubError(400, f"Your push was rejected because an LFS pointer ({path}) points to a missing object")
        files[path] = store.lfs_entry(oid)
    elif key == "deletedFile":
        if files.pop(path, None) is None:
            raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound", head_oid)
    elif key == "deletedFolder":
        folder = path.rstrip("/") + "/"
        doomed = [p for p in files if p.startswith(folder)]
        if not doomed:
            raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound", head_oid)
        for p in doomed:
            del files[p]
    else:
        raise HubError(400, f"Unknown commit operation {key!r}")


_REPO = rf"({_NAME})/({_NAME})"
_PREFIX = r"((?:datasets|spaces)/)?"
_API = r"^/api/(models|datasets|spaces)/" + _REPO
_LFS = rf"^/{_PREFIX}({_NAME})/({_NAME}?)\.git/info/lfs/objects"
_ROUTES = [
    ("POST", re.compile(r"^/api/repos/create$"), _Handler.create_repo),
    ("POST", re.compile(r"^/api/validate-yaml$"), _Handler.validate_yaml),
    ("GET", re.compile(rf"{_API}(?:/revision/([^/]+))?$"), _Handler.repo_info),
    ("GET", re.compile(rf"{_API}/tree/([^/]+)(?:/(.+))?$"), _Handler.tree),
    ("POST", re.compile(rf"{_API}/preupload/([^/]+)$"), _Handler.preupload),
    ("POST", re.compile(rf"{_API}/commit/([^/]+)$"), _Handler.commit),
    ("POST", re.compile(rf"{_LFS}/batch$"), _Handler.lfs_batch),
    ("PUT", re.compile(rf"{_LFS}/([0-9a-f]{{64}})/(\d+)$"), _Handler.lfs_upload),
    ("POST", re.compile(rf"{_LFS}/([0-9a-f]{{64}})/(\d+)/verify$"), _Handler.lfs_verify),
    ("GET", re.compile(rf"^/{_PREFIX}{_REPO}/resolve/([^/]+)/(.+)$"), _Handler.resolve),
]


class LocalHubServer(ThreadingHTTPServer):
    """The HTTP server plus what handlers share: the store, the public URL and a log of (method, path)."""

    daemon_threads = True

    def __init__(self, store: HubStore) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.store = store
        self.url = f"http://127.0.0.1:{self.server_port}"
        self.requests: list[tuple[str, str]] = []


class LocalHub:
    """A running local Hub: `start()` serves from a background thread, `stop()` shuts it down and joins it."""

    def __init__(self, root: Path) -> None:
        self.server = LocalHubServer(HubStore(root))
        self._thread = threading.Thread(target=self.server.serve_forever, name="local-hub", daemon=True)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def store(self) -> HubStore:
        return self.server.store

    @property
    def requests(self) -> list[tuple[str, str]]:
        return self.server.requests

    def start(self) -> LocalHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()


def point_clients_at(monkeypatch: pytest.MonkeyPatch, endpoint: str, hf_home: Path) -> None:
    """Send every Hub call of huggingface_hub and transformers to `endpoint`, even if both are already imported.

    Environment variables alone are not enough inside a test process: huggingface_hub copies `HF_ENDPOINT`,
    `HF_HOME`/`HF_HUB_CACHE`, `HF_HUB_OFFLINE` and `HF_HUB_DISABLE_XET` into `huggingface_hub.constants` at import
    time, the module-level `HfApi` behind `huggingface_hub.create_repo & co` keeps the endpoint it was built with,
    and transformers caches its own `HfApi` in `transformers.utils.hub._hf_api`. The client reads the constants at
    call time, so patching them (plus the two cached `HfApi` objects) redirects everything; the variables are set
    too for subprocesses. `HF_TOKEN` is read from the environment at every call. The shared HTTP session is closed so
    that the next one is built with `NO_PROXY` set; the caller closes it again at teardown, before stopping the
    server, so no pooled connection to a dead port survives the test. monkeypatch undoes the rest at teardown.
    """
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import close_session

    cache = hf_home / "hub"
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(cache),
        "HF_TOKEN": DUMMY_TOKEN,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    transformers_hub = sys.modules.get("transformers.utils.hub")
    if transformers_hub is not None:  # otherwise transformers builds its HfApi later, from the patched constants
        monkeypatch.setattr(transformers_hub, "_hf_api", None)
    close_session()
