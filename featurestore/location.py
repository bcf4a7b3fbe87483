"""Where a feature store lives and what is at its root: `StoreLocation` (a local folder, zarr LocalStore,
or any fsspec URL such as s3://bucket/fs, zarr FsspecStore; the backend package, e.g. s3fs, is an optional
dependency), the root metadata check shared by the reader, `fs build` and `fs info`, and the listing of
child groups one at a time."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

import zarr
import zarr.abc.store
import zarr.storage

from .errors import StoreError, one_line
from .runtime import tool_version
from .schema import SCHEMA_VERSION

# pathlib collapses "//": Path("s3://bucket/fs") is "s3:/bucket/fs". Callers that wrapped a URL in a Path
# still mean the URL, so a Path starting with a known fsspec protocol and ":/" is read back as one.
_COLLAPSED_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*):/(?!/)(.*)$")


@dataclass(frozen=True)
class StoreLocation:
    """A feature store's address. Local folders (plain paths or file:// URLs) use zarr's LocalStore,
    which writes every chunk atomically; anything else (s3://, gs://, memory://, ...) goes through
    fsspec and zarr's FsspecStore. Storage options (endpoints, credentials) come from fsspec's own
    configuration: environment variables such as FSSPEC_S3_ENDPOINT_URL, or ~/.config/fsspec/*.json."""

    url: str  # as shown to the user: the local path, or the URL
    protocol: str  # "file" for local folders
    local_path: Path | None  # the folder, for local stores

    @property
    def is_local(self) -> bool:
        return self.local_path is not None

    def __str__(self) -> str:
        return self.url

    def filesystem(self) -> tuple[Any, str]:
        """(fsspec filesystem, path inside it) for metadata, existence and size checks."""
        import fsspec.core

        if self.local_path is not None:
            return fsspec.filesystem("file"), str(self.local_path)
        try:
            return fsspec.core.url_to_fs(self.url)
        except ImportError as exc:  # fsspec: "Install s3fs to access S3"
            raise StoreError(f"store {self.url}: no fsspec backend for {self.protocol}:// is installed "
                             f"({exc}): install it (s3fs for s3://, gcsfs for gs://, adlfs for az://)") from None
        except ValueError as exc:
            raise StoreError(f"store {self.url}: {exc}; pass a local folder or an fsspec URL "
                             f"(s3://bucket/path, gs://bucket/path, ...)") from None

    def zarr_store(self, *, read_only: bool) -> zarr.abc.store.Store:
        if self.local_path is not None:
            return zarr.storage.LocalStore(str(self.local_path), read_only=read_only)
        self.filesystem()  # a missing backend or bad URL: one clear StoreError
        return zarr.storage.FsspecStore.from_url(self.url, read_only=read_only)

    def child(self, *parts: str) -> str:
        """Display form of a path inside the store (for messages)."""
        return "/".join([self.url.rstrip("/"), *parts])


def store_location(store: "str | os.PathLike | StoreLocation") -> StoreLocation:
    """Parse what a user passed as --store (or to FeatureStore.open): a path or an fsspec URL."""
    from fsspec.registry import known_implementations
    from fsspec.utils import get_protocol

    if isinstance(store, StoreLocation):
        return store
    text = os.fspath(store)
    if isinstance(store, PurePath):
        collapsed = _COLLAPSED_URL.match(text)
        if collapsed and collapsed.group(1).lower() in known_implementations \
                and collapsed.group(1).lower() not in ("file", "local"):
            text = f"{collapsed.group(1)}://{collapsed.group(2)}"
    if "://" not in text and "::" not in text:
        return StoreLocation(url=str(Path(text).expanduser()), protocol="file", local_path=Path(text).expanduser())
    protocol = get_protocol(text)
    if protocol in ("file", "local") and "::" not in text:
        local = Path(text.split("://", 1)[1]).expanduser()
        return StoreLocation(url=str(local), protocol="file", local_path=local)
    return StoreLocation(url=text, protocol=protocol, local_path=None)


# ----------------------------------------------------------------------------------------------------
# Validating a store (shared by the reader, `fs build` and `fs info`)


def read_root_metadata(store: "str | os.PathLike | StoreLocation") -> dict[str, Any] | None:
    """Root `zarr.json` of the store, or None when nothing is there (or an empty folder / prefix).
    Something there that is not a probe-distill store raises StoreError."""
    loc = store_location(store)
    where = loc.url
    fs, root = loc.filesystem()
    meta_key = root.rstrip("/") + "/zarr.json"
    try:
        raw = fs.cat_file(meta_key)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raw = None
    except Exception as exc:  # noqa: BLE001 - remote backends: credentials, permissions, network
        raise StoreError(f"cannot read {loc.child('zarr.json')} ({type(exc).__name__}: {exc}): check the "
                         f"--store URL and its credentials") from None
    if raw is None:
        try:
            if fs.isfile(root):
                raise StoreError(f"{where} is a file, not a feature store: pass --store a folder path")
            entries = fs.ls(root, detail=False) if fs.exists(root) else []
        except StoreError:
            raise
        except (FileNotFoundError, NotADirectoryError):
            entries = []
        except Exception as exc:  # noqa: BLE001 - see above
            raise StoreError(f"cannot list {where} ({type(exc).__name__}: {exc}): check the --store URL "
                             f"and its credentials") from None
        # Hidden entries (a build's lock folder `.locks`, `.DS_Store`) do not make a folder a non-store:
        # a first build killed before it wrote zarr.json leaves its lock behind.
        entries = [e for e in entries if not _basename(e).startswith(".")]
        if not entries:
            return None
        raise StoreError(f"{where} exists but is not a feature store (no zarr.json): "
                         f"pass a new or empty folder to --store")
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise StoreError(f"{loc.child('zarr.json')} is unreadable ({exc}): {where} is not a usable "
                         f"feature store") from None
    attrs = meta.get("attributes", {}) if isinstance(meta, dict) else {}
    if not isinstance(meta, dict) or meta.get("node_type") != "group" or "schema_version" not in attrs:
        raise StoreError(f"{where} is a Zarr node but not a probe-distill feature store "
                         f"(no schema_version attribute): pass a new or empty folder to --store")
    version = attrs["schema_version"]
    if version != SCHEMA_VERSION or not isinstance(version, int) or isinstance(version, bool):
        shown = f"{version!r} (a {type(version).__name__ if not isinstance(version, str) else 'string'})" \
            if not isinstance(version, int) or isinstance(version, bool) else str(version)
        raise StoreError(f"store {where} has schema version {shown}, this probe-distill "
                         f"({tool_version()}) reads version {SCHEMA_VERSION}: rebuild it into a new "
                         f"--store, or use the probe-distill release that wrote it")
    return meta


def open_zarr_group(store: "str | os.PathLike | StoreLocation", *, read_only: bool) -> zarr.Group:
    return zarr.open_group(store=store_location(store).zarr_store(read_only=read_only),
                           mode="r" if read_only else "r+")


def _basename(entry: Any) -> str:
    return PurePosixPath(str(entry).rstrip("/")).name


def child_names(location: StoreLocation, *parts: str) -> list[str]:
    """Names of the entries under `parts` of the store that may be Zarr children (sorted): hidden entries
    (the `.locks` folder of builds) and zarr.json left out. Listed with fsspec rather than zarr's
    `Group.groups()`, which parses every child at once: one damaged child would hide all the others, and
    zarr warns about every folder it does not recognise."""
    fs, root = location.filesystem()
    path = "/".join([root.rstrip("/"), *parts])
    try:
        entries = fs.ls(path, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except Exception as exc:  # noqa: BLE001 - remote backends: credentials, permissions, network
        raise StoreError(f"cannot list {location.child(*parts)} ({type(exc).__name__}: {exc}): check the "
                         f"--store URL and its credentials") from None
    names = {_basename(e) for e in entries}
    return sorted(n for n in names if n and not n.startswith(".") and n != "zarr.json")


def open_child(location: StoreLocation, group: zarr.Group, name: str, what: str) -> Any:
    """`group[name]`, or None when `name` is no Zarr node (a stray folder); StoreError (one line) when its
    metadata cannot be read (a truncated zarr.json)."""
    try:
        return group[name]
    except KeyError:
        return None
    except Exception as exc:  # noqa: BLE001 - JSON and metadata validation errors of a damaged zarr.json
        path = location.child(*[p for p in (group.path, name) if p])
        raise StoreError(f"the metadata of {what} {path} is unreadable ({one_line(exc)}): the store is "
                         f"damaged there; delete {path} and rebuild it with `fs build`") from None
