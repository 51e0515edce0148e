"""Content-addressed tensor objects shared by a run's incremental checkpoints.

An object is one tensor's raw bytes, named by what they are: ``<xxh3-64 hex>-<byte count>``. A checkpoint
lists the objects it uses; a tensor that did not change since an earlier checkpoint (a frozen backbone,
embeddings, a fine-tune's base weights) is written once and referenced again. Objects live in the run
directory's ``objects/`` folder, found by the reader from the checkpoint's place (never from a path in a
file), and are deleted only when no checkpoint that is kept references them.
"""

from __future__ import annotations

import mmap
import os
import re
import stat
from collections.abc import Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import xxhash

from torchkeep import _config
from torchkeep._warn import warn
from torchkeep.checkpoint.layout import MANIFEST_FILE
from torchkeep.errors import CheckpointNotFoundError, CorruptCheckpointError
from torchkeep.format.dtypes import CODE_TO_DTYPE, DTYPE_TO_CODE, ITEMSIZE
from torchkeep.format.io import write_all
from torchkeep.format.layout import byte_view, digest, fill_from
from torchkeep.format.staging import host_pieces, is_staged, staged_digests
from torchkeep.storage.base import Storage
from torchkeep.storage.local import LocalStorage, is_temporary, write_errors

OBJECTS_DIR = "objects"
KEY = re.compile(r"^[0-9a-f]{16}-(0|[1-9][0-9]{0,18})$")
_ANY_KEY = re.compile(rb"[0-9a-f]{16}-[0-9]{1,19}")
# Tensors smaller than this stay in the checkpoint's own tensor file: not worth a file of their own.
MIN_OBJECT_BYTES = 64 * 1024


def objects_dir(checkpoint: Path) -> Path:
    """The shared folder of the run a checkpoint folder belongs to."""
    return checkpoint.parent / OBJECTS_DIR


def objects_store(checkpoint: str | Path, storage_options: Mapping[str, Any] | None = None) -> Storage:
    """Where the objects of the run a checkpoint (a folder or a URL) belongs to are kept."""
    from torchkeep.storage.remote import RemoteStorage, is_url

    if is_url(checkpoint):
        run = str(checkpoint).rstrip("/").rsplit("/", 1)[0]
        return RemoteStorage(f"{run}/{OBJECTS_DIR}", storage_options)
    return LocalStorage(objects_dir(Path(checkpoint)))


def key_of(tensor: torch.Tensor) -> str:
    view = byte_view(tensor)
    return f"{digest(view)}-{view.nbytes}"


def keys_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Every tensor's object key: host tensors hashed in parallel (xxh3 releases the GIL), GPU tensors
    through the staging buffers (never copied to the host whole)."""
    staged = {n: t for n, t in tensors.items() if is_staged(t)}
    digests = staged_digests(staged)
    names = [n for n in tensors if n not in staged]
    with ThreadPoolExecutor(max_workers=max(1, _config.HASH_THREADS)) as pool:
        keys = dict(zip(names, pool.map(lambda n: key_of(tensors[n]), names), strict=True))
    keys.update((n, f"{digests[n]}-{t.numel() * t.element_size()}") for n, t in staged.items())
    return {n: keys[n] for n in tensors}


def describe(tensor: torch.Tensor, key: str) -> dict[str, Any]:
    return {"object": key, "dtype": DTYPE_TO_CODE[tensor.dtype], "shape": list(tensor.shape)}


def put(store: Storage, key: str, tensor: torch.Tensor) -> int:
    """Write an object unless it is there, sound; returns the bytes written (0 when it already was).

    An object already in a folder is reused only once its bytes are checked against its key (it is
    usually still in the page cache): one damaged on disk (a flipped bit, a stray write, a truncation)
    is rewritten, atomically, from ``tensor``, with a warning naming it, so a damaged object never
    spreads to later checkpoints. On an object store an object of the right size is trusted (reading
    each one back at every save would download the run's unchanged tensors again).
    """
    nbytes = tensor.numel() * tensor.element_size()
    damage = _damage(store, key, nbytes)
    if damage is None:
        return 0
    with store.open_write(key) as sink:  # atomic: whole or not at all, on a disk or an object store
        if is_staged(tensor):  # a GPU tensor: its bytes pass through the small pinned buffers
            for _, piece in host_pieces([tensor]):
                write_all(sink, piece)
        else:
            write_all(sink, byte_view(tensor))
    if damage:
        warn(
            f"{where(store, key)}: this shared object was damaged ({damage}); rewrote it from the tensor being "
            "saved (the same bytes as its key), so earlier checkpoints that use it load again"
        )
    return nbytes


def _damage(store: Storage, key: str, nbytes: int) -> str | None:
    """Why the stored object ``key`` cannot be reused: "" when it is absent, None when it is sound."""
    local = store.local_path(key)
    if local is None:
        return None if store.exists(key) and store.size(key) == nbytes else ""
    try:
        st = os.lstat(local)
    except FileNotFoundError:
        return ""
    except OSError as exc:
        return f"it cannot be read: {exc}"
    if not stat.S_ISREG(st.st_mode):
        return "it is not a plain file"  # a link or a folder: the reader refuses it
    if st.st_size != nbytes:
        return f"it holds {st.st_size} bytes, not {nbytes}"
    try:
        size, checksum = stored_digest(store, key)
    except OSError as exc:
        return f"it cannot be read: {exc}"
    if f"{checksum}-{size}" != key:
        return "its bytes no longer match its checksum"
    return None


def stored_digest(store: Storage, name: str) -> tuple[int, str]:
    """The size and checksum (``layout.digest``'s) of a stored file's bytes: hashed from the page cache on a
    disk (mapped, no copy), streamed from an object store."""
    local = store.local_path(name)
    if local is not None:
        with open(local, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return 0, digest(b"")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                return size, digest(mapped)
    hasher, size = xxhash.xxh3_64(), 0
    with store.open_read(name) as f:
        while chunk := f.read(_config.SMALL_BATCH_BYTES):
            hasher.update(chunk)
            size += len(chunk)
    return size, hasher.hexdigest()


def where(store: Storage, key: str) -> str:
    """An object's path or URL, for messages."""
    return store.local_path(key) or f"{getattr(store, 'url', '')}/{key}"


def check_entries(entries: Any, where: str) -> dict[str, dict[str, Any]]:
    """A manifest's ``shared_tensors``, validated before any object is opened."""
    if not isinstance(entries, dict):
        raise CorruptCheckpointError(where, "'shared_tensors' is not an object")
    for name, entry in entries.items():
        if not isinstance(entry, dict):
            raise CorruptCheckpointError(where, f"shared tensor {name!r:.80} is not an object")
        key, code, shape = entry.get("object"), entry.get("dtype"), entry.get("shape")
        if not isinstance(key, str) or not KEY.match(key):
            raise CorruptCheckpointError(where, f"shared tensor {name!r:.80} names object {key!r:.80}, not a key")
        if code not in CODE_TO_DTYPE:
            raise CorruptCheckpointError(where, f"shared tensor {name!r:.80} has dtype {code!r:.40}")
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**63 for d in shape):
            raise CorruptCheckpointError(where, f"shared tensor {name!r:.80} has shape {shape!r:.80}")
        numel = 1
        for d in shape:
            numel *= d
        if numel * ITEMSIZE[code] != int(key.rsplit("-", 1)[1]):
            raise CorruptCheckpointError(where, f"shared tensor {name!r:.80}: its shape and dtype do not fit {key}")
    return entries


def read(store: Storage, name: str, entry: Mapping[str, Any], *, verify: bool) -> torch.Tensor:
    """One shared tensor, read into its own memory and checked against its key."""
    key = entry["object"]
    path = where(store, key)
    dtype = CODE_TO_DTYPE[entry["dtype"]]
    local = store.local_path(key)
    try:
        # The object is there and of its key's size before anything is allocated for it: a manifest may
        # claim any size, the file on disk cannot lie about its own.
        if (local is not None and Path(local).is_symlink()) or not store.exists(key):
            raise CorruptCheckpointError(path, f"object of shared tensor {name!r} is missing", key=name)
        if store.size(key) != int(key.rsplit("-", 1)[1]):
            raise CorruptCheckpointError(path, f"object of shared tensor {name!r} has the wrong size", key=name)
        tensor = torch.empty(entry["shape"], dtype=dtype)
        view = byte_view(tensor)
        with store.open_read(key) as f:
            if not fill_from(f, view):  # every backend reads into
                raise CorruptCheckpointError(path, "object ended early (truncated?)", key=name)
    except (OSError, CheckpointNotFoundError) as exc:
        raise CorruptCheckpointError(path, f"object of shared tensor {name!r} cannot be read: {exc}") from exc
    if verify and f"{digest(view)}-{view.nbytes}" != key:
        raise CorruptCheckpointError(path, "checksum mismatch: the object's bytes are damaged", key=name)
    return tensor


def referenced(manifest: Mapping[str, Any]) -> set[str]:
    entries = manifest.get("shared_tensors")
    if not isinstance(entries, dict):
        return set()
    return {e["object"] for e in entries.values() if isinstance(e, dict) and isinstance(e.get("object"), str)}


def referenced_by_folder(checkpoint: Path) -> set[str]:
    """Every key a checkpoint's manifest mentions, read loosely (for a manifest that no longer parses)."""
    try:
        with open(checkpoint / MANIFEST_FILE, "rb") as f:
            raw = f.read(_config.MAX_JSON_BYTES)
    except OSError:
        return set()
    return _keys_in(raw)


def _keys_in(raw: bytes) -> set[str]:
    return {m.decode() for m in _ANY_KEY.findall(raw)}


# What in_use remembers of a local manifest: its (device, inode, size, mtime) and the keys it mentions.
ManifestMemo = dict[str, tuple[tuple[int, int, int, int], frozenset[str]]]


def in_use(run: Storage, *, skip: Collection[str] = (), memo: ManifestMemo | None = None) -> set[str] | None:
    """Every object key some manifest in the run folder mentions; None when one cannot be read.

    Each direct sub-folder holding a ``manifest.json`` counts, whatever its name: a step folder, one a
    person renamed (``best``), another template's, a copy, and the temporary folder of a save still being
    written. Manifests are read loosely (every key-shaped string), so one that no longer parses still
    protects what it names.

    Args:
        run: the run folder (a local one, or one at a URL).
        skip: names of folders being deleted (retired checkpoints, already renamed aside).
        memo: keys of local manifests remembered between calls; a manifest is replaced, not edited in
            place, so the same device, inode, size and time mean the same keys.
    """
    if isinstance(run, LocalStorage):
        return _in_use_local(run.root, skip, {} if memo is None else memo)
    used: set[str] = set()
    for name in run.list():
        folder, _, rest = name.partition("/")
        if rest != MANIFEST_FILE or folder == OBJECTS_DIR or folder in skip:
            continue
        try:
            with run.open_read(name) as f:
                used |= _keys_in(f.read(_config.MAX_JSON_BYTES))
        except (OSError, CheckpointNotFoundError):
            return None  # perhaps readable later: until then it may use any object
    return used


def _in_use_local(root: Path, skip: Collection[str], memo: ManifestMemo) -> set[str] | None:
    used: set[str] = set()
    seen: set[str] = set()
    try:
        with os.scandir(root) as entries:
            folders = [e.name for e in entries if e.name != OBJECTS_DIR and e.name not in skip and e.is_dir()]
    except OSError:
        return None
    for name in folders:  # links to folders too: a checkpoint reached through one uses these objects
        manifest = root / name / MANIFEST_FILE
        try:
            st = os.stat(manifest)
        except (FileNotFoundError, NotADirectoryError):
            if not os.path.isdir(root / name):
                return None  # renamed since the listing (a save committing): its new name was not seen
            continue  # no manifest (yet): uses nothing
        except OSError:
            return None
        signature = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        remembered = memo.get(name)
        if remembered is None or remembered[0] != signature:
            try:
                with open(manifest, "rb") as f:
                    remembered = (signature, frozenset(_keys_in(f.read(_config.MAX_JSON_BYTES))))
            except IsADirectoryError:
                continue  # not a manifest
            except OSError:
                return None  # unreadable, or renamed since the listing: perhaps readable later
            memo[name] = remembered
        seen.add(name)
        used |= remembered[1]
    for name in memo.keys() - seen:
        del memo[name]
    return used


def collect(store: Storage, keep: Iterable[str]) -> int:
    """Delete every object no kept checkpoint references (and, in a folder, temporaries of objects); returns
    how many."""
    wanted = set(keep)
    doomed = [name for name in store.list() if KEY.match(name) and name not in wanted]
    if isinstance(store, LocalStorage) and store.root.is_dir():  # what a killed write left (never listed)
        doomed += [entry.name for entry in os.scandir(store.root) if is_temporary(entry.name)]
    for name in doomed:
        if isinstance(store, LocalStorage):
            with write_errors(store.root / name, "deleting an object no checkpoint uses"):
                os.unlink(store.root / name)
        else:
            store.delete(name)
    return len(doomed)


def collect_unused(
    run: Storage, store: Storage, *, skip: Collection[str] = (), memo: ManifestMemo | None = None
) -> int:
    """Delete the objects (``store``, the run's ``objects/``) that no manifest anywhere in the run folder
    mentions (see :func:`in_use`); returns how many. While some manifest cannot be read, nothing is deleted.

    The one rule every manager follows, at start-up and after retention: which folders the manager itself
    lists (its template, its steps) does not matter, so a renamed checkpoint, or a run opened with another
    template, keeps its objects.
    """
    used = in_use(run, skip=skip, memo=memo)
    if used is None:
        return 0
    return collect(store, used)
