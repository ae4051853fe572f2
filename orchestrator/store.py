"""The Zarr v3 job store: the only channel between the tasks of a render.

Layout of one job group (a local directory or any fsspec URL):

    zarr.json            group attributes, written once at creation: spec, plan, model identity, format version
    latents/             float16 [T_lat, C, h, w], one chunk per latent frame, Blosc-zstd + bitshuffle
    refined/             the same, for a plan with refinement tasks: what they make of the drafts in latents/
                         (both kept, so a refinement task that runs again starts from the same drafts)
    tasks/<task_id>      completion marker of a generation task (a group whose attributes hold the latent
                         frames it wrote and a sha256 per frame); written only after the frames read back intact
    segments/<id>.mp4    an encoded video segment; segments/<id> is its marker (sha256 of the file)
    output               record of the final video (path, sha256, frames)
    runs/<run_id>        one record per render/resume invocation (written by the client only)

Nothing else lives in the group, so xarray and zarr open it without warnings. The write lock of a local store
is the sibling file `<store>.lock` (`out.zarr` -> `out.zarr.lock`), which also holds the pid, host and start
time of the render or resume writing the store while it holds the lock.

A task counts as done only if its marker parses and every checksum it records matches the frame in the
store, so a torn chunk or a torn marker makes the task run again on resume. Markers are separate nodes, so
concurrent tasks never update the same metadata.
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import uuid
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterable, Iterator

import fsspec
import numpy as np
import zarr
from filelock import FileLock, Timeout
from zarr.codecs import BloscCodec
from zarr.storage import FsspecStore, LocalStore

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
LATENT_DIMENSIONS = ("latent_frame", "channel", "y", "x")
LATENT_ARRAYS = ("latents", "refined")
_GROUPS = ("tasks", "segments", "runs")
LOCK_SUFFIX = ".lock"
# flock errors that mean "this filesystem cannot lock", not "someone else holds the lock".
_LOCKING_UNSUPPORTED = frozenset({errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP})


class StoreError(RuntimeError):
    """The job store cannot be used as asked (missing, unreadable, or a write did not land)."""


class StoreIncomplete(StoreError, ValueError):
    """The job group exists but its layout does not: its creation was interrupted, or is still under way.
    Bad input like StoreMismatch (the CLI exits 2): rendering again with --force recreates it."""


class StoreWriteError(StoreError, OSError):
    """Writing to the job store failed (full disk, read-only mount, permissions...). Finished work is kept."""

    def __init__(self, what: str, url: str, cause: BaseException):
        self.what, self.url, self.cause = what, url, cause
        reason = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
        StoreError.__init__(self, f"cannot write {what} to the job store {url}: {reason}")


class StoreMismatch(ValueError):
    """An existing store belongs to a different job; `differences` maps field -> (stored, requested)."""

    def __init__(self, url: str, differences: dict):
        self.url, self.differences = url, differences
        shown = ", ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, (a, b) in list(differences.items())[:4])
        more = f" and {len(differences) - 4} more" if len(differences) > 4 else ""
        super().__init__(
            f"store: {url} was created for a different job ({shown}{more}); "
            "use --force to replace it, or choose another --store"
        )


class StoreLocked(ValueError):
    """Another render or resume is writing this job store; found before any rendering starts.

    `holder` is what that writer recorded about itself (pid, host, started), or {} when it is unknown.
    """

    def __init__(self, url: str, holder: dict):
        self.url, self.holder = url, holder
        if holder:
            who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
                   f"since {holder.get('started', '?')}")
        else:
            who = "holder unknown"
        super().__init__(
            f"store: {url} is being written by another render or resume ({who}); "
            f"wait for it to end, or stop it and run `longshot resume {url}`"
        )


class PathNotWritable(ValueError):
    """An output or store location cannot be written; found before any rendering starts."""

    def __init__(self, field: str, path: str, reason: str):
        self.field, self.path, self.reason = field, path, reason
        super().__init__(f"{field}={path!r}: not writable: {reason}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def frame_checksum(frame: np.ndarray) -> str:
    """sha256 of one latent frame as stored (float16, C order, little endian)."""
    data = np.ascontiguousarray(frame, dtype="<f2")
    return "sha256:" + hashlib.sha256(data.tobytes()).hexdigest()


def file_checksum(fs, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def _split_url(url: str) -> tuple[fsspec.AbstractFileSystem, str, bool]:
    """(filesystem, path inside it, is_local) for a plain path or an fsspec URL."""
    fs, path = fsspec.core.url_to_fs(url)
    local = isinstance(fs, fsspec.implementations.local.LocalFileSystem)
    return fs, path.rstrip("/") or "/", local


def _zarr_store(url: str, read_only: bool = False):
    fs, path, local = _split_url(url)
    if local:
        return LocalStore(path, read_only=read_only)
    return FsspecStore.from_url(url, read_only=read_only)


def is_store(url: str) -> bool:
    """True if `url` holds a Longshot job store (any format version)."""
    try:
        group = zarr.open_group(_zarr_store(url, read_only=True), mode="r")
    except Exception:
        return False
    return "longshot_format" in group.attrs


class JobStore:
    """One job's Zarr group. Create with `JobStore.create` / `JobStore.open_for`, reopen with `JobStore.open`."""

    def __init__(self, url: str, group: zarr.Group):
        self.url = url
        self.group = group
        self.fs, self.root, self.is_local = _split_url(url)
        attrs = group.attrs.asdict()
        if "longshot_format" not in attrs:
            raise StoreError(f"{url} is a Zarr group but not a Longshot job store")
        if attrs["longshot_format"] != FORMAT_VERSION:
            raise StoreError(
                f"{url} uses job store format {attrs['longshot_format']}; this version reads {FORMAT_VERSION}"
            )
        self.attrs = attrs
        try:
            self.latents: zarr.Array = group["latents"]
        except KeyError as err:
            # Creation writes the group's attributes first, then the arrays: a render killed in between (or a
            # reader racing one that is starting) sees a group without latents. Nothing was generated into it.
            raise StoreIncomplete(f"{url} is an incomplete job store (no latents array): its creation was "
                                  f"interrupted or is still under way; render again with --force to "
                                  f"recreate it") from err

    # -- creation and opening ----------------------------------------------------------------------------------

    @classmethod
    def create(cls, url: str, *, spec: dict, plan: dict, model: dict, latent_shape: tuple[int, int, int, int],
               extra: dict | None = None) -> "JobStore":
        """Create a new job group at `url` (which must not hold one). Attributes are written here, once.
        The `refined` array is made only for a plan with refinement tasks."""
        attributes = {
            "longshot_format": FORMAT_VERSION,
            "created": _now(),
            "spec": spec,
            "plan": plan,
            "model": model,
            **(extra or {}),
        }
        try:
            store = _zarr_store(url)
            group = zarr.create_group(store, attributes=attributes)
            descriptions = {"latents": "diffusion latents, one chunk per latent frame",
                            "refined": "refined diffusion latents, one chunk per latent frame"}
            refines = any(task.get("refine") for task in plan.get("tasks", ()))
            for name in LATENT_ARRAYS[: 2 if refines else 1]:
                group.create_array(
                    name,
                    shape=tuple(latent_shape),
                    chunks=(1, *latent_shape[1:]),
                    dtype="float16",
                    compressors=BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle", typesize=2),
                    # NaN marks a frame never written: a missing chunk cannot pass for real data.
                    fill_value=np.float16("nan"),
                    dimension_names=LATENT_DIMENSIONS,
                    attributes={"description": descriptions[name]},
                )
            for name in _GROUPS:
                group.create_group(name)
        except OSError as err:
            raise StoreWriteError("the job layout", url, err) from err
        return cls(url, group)

    @classmethod
    def open(cls, url: str, *, read_only: bool = False) -> "JobStore":
        """Open an existing job store; StoreError if there is none at `url`."""
        try:
            group = zarr.open_group(_zarr_store(url, read_only=read_only), mode="r" if read_only else "r+")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, NotADirectoryError) as err:
            raise StoreError(f"no job store at {url}") from err
        return cls(url, group)

    @classmethod
    def open_for(cls, url: str, *, spec: dict, content: dict, plan: dict, model: dict,
                 latent_shape: tuple[int, int, int, int], force: bool = False) -> "JobStore":
        """Open the store for this job, creating it if absent.

        `content` is the spec's content fields (what decides the video). An existing store whose content,
        plan, model or shape differs is refused with StoreMismatch unless `force`, which replaces it.
        """
        if is_store(url):
            try:
                existing = cls.open(url)
            except StoreIncomplete:
                if not force:
                    raise
            else:
                differences = existing.differences(content=content, plan=plan, model=model,
                                                   latent_shape=latent_shape)
                if not differences:
                    return existing
                if not force:
                    raise StoreMismatch(url, differences)
            remove_store(url)
        else:
            ensure_empty_location(url)
        return cls.create(url, spec=spec, plan=plan, model=model, latent_shape=latent_shape)

    def differences(self, *, content: dict | None = None, plan: dict | None = None, model: dict | None = None,
                    latent_shape=None) -> dict:
        found: dict = {}
        if content is not None:
            stored = dict(self.spec)
            stored.pop("output", None)
            stored.pop("store", None)
            for key in sorted(set(stored) | set(content)):
                if key not in stored and content.get(key) is None:
                    continue  # a field added since this store was made, left at its default
                if stored.get(key) != content.get(key):
                    found[key] = (stored.get(key), content.get(key))
        if model is not None and self.model != model:
            found["model identity"] = (self.model, model)
        if latent_shape is not None and tuple(self.latents.shape) != tuple(latent_shape):
            found["latent shape"] = (tuple(self.latents.shape), tuple(latent_shape))
        if plan is not None and not found and self.plan != plan:
            found["plan"] = ("stored plan", "a different plan")
        return found

    # -- attributes (read-only after creation) -----------------------------------------------------------------

    @property
    def spec(self) -> dict:
        return self.attrs["spec"]

    @property
    def plan(self) -> dict:
        return self.attrs["plan"]

    @property
    def model(self) -> dict:
        return self.attrs["model"]

    # -- latents -----------------------------------------------------------------------------------------------

    def latent_array(self, name: str = "latents") -> zarr.Array:
        """One of the store's latent arrays (LATENT_ARRAYS); StoreError if this store has none of that name."""
        if name not in LATENT_ARRAYS:
            raise ValueError(f"array={name!r}: must be one of {', '.join(LATENT_ARRAYS)}")
        if name == "latents":
            return self.latents
        try:
            return self.group[name]
        except KeyError:
            raise StoreError(f"{self.url} has no {name!r} array: its plan has no refinement tasks") from None

    def write_latents(self, indices: Iterable[int], frames, *, array: str = "latents") -> dict[str, str]:
        """Write latent frames at absolute indices of `array`; read them back and return {index: sha256}.

        Raises StoreWriteError when the write fails or what reads back differs from what was written.
        """
        target = self.latent_array(array)
        indices = [int(i) for i in indices]
        values = _as_float16(frames)
        if values.shape != (len(indices), *target.shape[1:]):
            raise ValueError(f"frames of shape {values.shape} do not fit {len(indices)} latent frames "
                             f"of shape {tuple(target.shape[1:])}")
        try:
            for index, frame in zip(indices, values):
                target[index] = frame
        except OSError as err:
            raise StoreWriteError(f"{_frames_of(array)} {_ranges(indices)}", self.url, err) from err
        stored = self.read_latents(indices, array=array)
        checksums = {}
        for index, wanted, got in zip(indices, values, stored):
            if wanted.tobytes() != got.tobytes():
                raise StoreWriteError(f"latent frame {index}", self.url, OSError("the frame did not read back intact"))
            checksums[str(index)] = frame_checksum(got)
        return checksums

    def read_latents(self, indices: Iterable[int], *, array: str = "latents") -> np.ndarray:
        """float16 (n, C, h, w) at absolute indices of `array`; StoreError if any frame is missing or unreadable."""
        source = self.latent_array(array)
        what = _frames_of(array)
        indices = [int(i) for i in indices]
        if not indices:
            return np.zeros((0, *source.shape[1:]), dtype=np.float16)
        try:
            values = source.get_orthogonal_selection((indices,))
        except Exception as err:  # a torn chunk fails to decompress; name the frame it belongs to
            for index in indices:
                try:
                    source[index]
                except Exception:
                    raise StoreError(f"{what[:-1]} {index} in {self.url} is unreadable: {err}") from err
            raise StoreError(f"{what} {_ranges(indices)} in {self.url} are unreadable: {err}") from err
        missing = [i for i, frame in zip(indices, values) if np.isnan(frame).all()]
        if missing:
            raise StoreError(f"{what} {_ranges(missing)} have not been written to {self.url}")
        return values

    def read_video_latents(self, indices: Iterable[int], *, given: Iterable[int] = (),
                           refined: bool = False) -> np.ndarray:
        """The latents a video is decoded from: with `refined`, the refined array's, except the `given` frames
        (conditioning inputs, never refined), which come from the latents array like every frame without it."""
        indices = [int(i) for i in indices]
        if not refined:
            return self.read_latents(indices)
        given = set(int(i) for i in given)
        values = self.read_latents([i for i in indices if i not in given], array="refined")
        if len(values) == len(indices):
            return values
        drafts = self.read_latents([i for i in indices if i in given])
        merged = np.empty((len(indices), *values.shape[1:]), dtype=values.dtype)
        is_given = np.array([i in given for i in indices])
        merged[is_given], merged[~is_given] = drafts, values
        return merged

    def _frame_checksum_or_none(self, index: int, array: str = "latents") -> str | None:
        try:
            return frame_checksum(self.latent_array(array)[index])
        except Exception:
            return None

    # -- generation task markers -------------------------------------------------------------------------------

    def write_task_marker(self, task_id: str, checksums: dict[str, str], **info) -> None:
        """Record a generation task as done; call only after `write_latents` returned its checksums."""
        record = {"task_id": task_id, "checksums": checksums, "written": _now(), **info}
        self._write_node(f"tasks/{task_id}", record, f"the marker of task {task_id}")

    def task_marker(self, task_id: str) -> dict | None:
        return self._read_node(f"tasks/{task_id}")

    def task_done(self, task_id: str, latent: Iterable[int] | None = None, array: str | None = None,
                  kept: Iterable[int] | None = None) -> bool:
        """True only if the marker parses, covers `latent` (when given), names `array` (when given) as the one
        the task wrote (refinement tasks write `refined`) and every checksum matches the frame there, or, with
        `kept`, those of the frames it names: the others a later task of the plan writes again (refinement pass
        1 takes over frames at the ends of pass-0 blocks)."""
        marker = self.task_marker(task_id)
        if marker is None or not isinstance(marker.get("checksums"), dict):
            return False
        checksums = marker["checksums"]
        written = marker.get("array", "latents")
        if written not in LATENT_ARRAYS or (array is not None and written != array):
            return False
        if latent is not None and set(checksums) != {str(i) for i in latent}:
            return False
        if kept is not None:
            kept = {str(int(i)) for i in kept}
            if not kept <= set(checksums):
                return False
            checksums = {i: digest for i, digest in checksums.items() if i in kept}
        return all(self._frame_checksum_or_none(int(i), written) == digest for i, digest in checksums.items())

    def done_tasks(self, tasks: Iterable) -> set[str]:
        """Ids of the given generation tasks (objects with .task_id, .latent, .refine and .kept) whose markers
        verify."""
        return {task.task_id for task in tasks
                if self.task_done(task.task_id, task.latent, task_array(getattr(task, "refine", False)),
                                  getattr(task, "kept", None))}

    # -- conditioning inputs (the plan's `given` frames) ---------------------------------------------------------

    def write_given_marker(self, checksums: dict[str, str], **info) -> None:
        self._write_node("tasks/given", {"task_id": "given", "checksums": checksums, "written": _now(), **info},
                         "the conditioning inputs' marker")

    def given_done(self, given: Iterable[int]) -> bool:
        given = list(given)
        return not given or self.task_done("given", given)

    # -- segments ----------------------------------------------------------------------------------------------

    def segment_url(self, segment_id: str) -> str:
        return self._child(f"segments/{segment_id}.mp4")

    @contextmanager
    def segment_writer(self, segment_id: str) -> Iterator[str]:
        """Yield the local path to encode a segment into.

        On a local store that is the segment's place in the store (the encoder publishes the file under its
        name only when complete); otherwise a temporary file that is uploaded when the block ends.
        """
        final = self._path(f"segments/{segment_id}.mp4")
        if self.is_local:
            yield final
            return
        tmp = tempfile.mkdtemp(prefix="longshot-")
        try:
            local = os.path.join(tmp, f"{segment_id}.mp4")
            yield local
            try:
                self.fs.put_file(local, final)
            except OSError as err:
                raise StoreWriteError(f"segment {segment_id}", self.url, err) from err
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def write_segment_marker(self, segment_id: str, **info) -> None:
        digest = file_checksum(self.fs, self._path(f"segments/{segment_id}.mp4"))
        self._write_node(f"segments/{segment_id}", {"segment_id": segment_id, "sha256": digest,
                                                     "written": _now(), **info},
                         f"the marker of segment {segment_id}")

    def segment_marker(self, segment_id: str) -> dict | None:
        return self._read_node(f"segments/{segment_id}")

    def segment_done(self, segment_id: str) -> bool:
        marker = self.segment_marker(segment_id)
        if marker is None:
            return False
        try:
            return file_checksum(self.fs, self._path(f"segments/{segment_id}.mp4")) == marker.get("sha256")
        except (OSError, FileNotFoundError):
            return False

    @contextmanager
    def local_segments(self, segment_ids: list[str]) -> Iterator[list[str]]:
        """Local file paths of the segments (downloaded to a temporary directory for remote stores)."""
        if self.is_local:
            yield [self._path(f"segments/{s}.mp4") for s in segment_ids]
            return
        tmp = tempfile.mkdtemp(prefix="longshot-")
        try:
            paths = []
            for segment_id in segment_ids:
                local = os.path.join(tmp, f"{segment_id}.mp4")
                self.fs.get_file(self._path(f"segments/{segment_id}.mp4"), local)
                paths.append(local)
            yield paths
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- final output ------------------------------------------------------------------------------------------

    def write_output_record(self, path: str, **info) -> None:
        fs, inner, _ = _split_url(path)
        record = {"path": path, "sha256": file_checksum(fs, inner), "written": _now(), **info}
        self._write_node("output", record, "the output record")

    def output_record(self) -> dict | None:
        return self._read_node("output")

    def output_done(self, path: str | None = None) -> bool:
        record = self.output_record()
        if record is None or (path is not None and record.get("path") != path):
            return False
        try:
            fs, inner, _ = _split_url(record["path"])
            return file_checksum(fs, inner) == record.get("sha256")
        except (OSError, FileNotFoundError, KeyError):
            return False

    # -- run records (client only) -----------------------------------------------------------------------------

    def write_run_record(self, run_id: str, record: dict) -> None:
        self._write_node(f"runs/{run_id}", {"run_id": run_id, **record}, "the run record")

    def runs(self) -> list[dict]:
        try:
            names = sorted(name for name, _ in self.group["runs"].groups())
        except Exception:
            return []
        records = [self._read_node(f"runs/{name}") for name in names]
        return sorted((r for r in records if r), key=lambda r: r.get("started", ""))

    # -- helpers -----------------------------------------------------------------------------------------------

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def _child(self, key: str) -> str:
        return f"{self.url.rstrip('/')}/{key}"

    def _write_node(self, path: str, attributes: dict, what: str) -> None:
        try:
            zarr.create_group(self.group.store, path=path, attributes=attributes, overwrite=True)
        except OSError as err:
            raise StoreWriteError(what, self.url, err) from err

    def _read_node(self, path: str) -> dict | None:
        """Attributes of a marker node, or None when it is missing or torn."""
        try:
            return zarr.open_group(self.group.store, path=path, mode="r").attrs.asdict()
        except Exception:
            return None


def _frames_of(array: str) -> str:
    """How messages name frames of a latent array: "latent frames" or "refined frames"."""
    return ("latent" if array == "latents" else array) + " frames"


def task_array(refine: bool) -> str:
    """The latent array a task writes: refinement tasks their own, so the drafts they start from stay."""
    return "refined" if refine else "latents"


def _as_float16(frames) -> np.ndarray:
    if hasattr(frames, "detach"):  # torch.Tensor, without importing torch here
        frames = frames.detach().to("cpu").float().numpy()
    return np.ascontiguousarray(np.asarray(frames), dtype=np.float16)


def _ranges(indices: list[int]) -> str:
    """[0,1,2,5] -> '0-2,5'"""
    if not indices:
        return ""
    parts, start, prev = [], indices[0], indices[0]
    for i in list(indices[1:]) + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(f"{start}-{prev}" if prev != start else f"{start}")
        if i is not None:
            start = prev = i
    return ",".join(parts)


def lock_path(url: str) -> str:
    """The write lock file of the local job store at `url`: `<store>.lock`, beside the store, never inside it."""
    _, path, _ = _split_url(url)
    return path + LOCK_SUFFIX


@contextmanager
def store_write_lock(url: str) -> Iterator[None]:
    """Hold the exclusive write lock of the job store at `url` for the block.

    Raises StoreLocked at once, without waiting, when another process holds it. The lock is an OS file lock
    (flock; LockFileEx on Windows) on `<store>.lock` beside the store, which the kernel drops when its process ends
    in any way, SIGKILL included, so a killed render never blocks its resume. The store's parent directory is
    created if absent, the store itself is not. While held, the lock file holds a JSON record of who holds it, for
    the error the next writer gets; it is left empty on release. Readers such as `job_status` never take it.
    """
    _, _, local = _split_url(url)
    lock = None
    if local:
        lock_file = lock_path(url)
        # fallback_to_soft=False: where flock is missing, filelock would otherwise fall back to a marker file
        # that a killed render leaves behind, blocking its resume.
        lock = FileLock(lock_file, blocking=False, fallback_to_soft=False)
        try:
            os.makedirs(os.path.dirname(lock_file), exist_ok=True)
            lock.acquire()
        except Timeout:
            raise StoreLocked(url, _read_lock_holder(lock_file)) from None
        except OSError as err:
            if err.errno not in _LOCKING_UNSUPPORTED:
                raise StoreWriteError("the lock file", url, err) from err
            lock = None
    if lock is None:
        # Object stores (s3://, gs://...) have no lock that every writer sees and that dies with its holder, and
        # some network filesystems have no flock; a marker object would outlive a killed render and block its
        # resume, which is worse than no lock.
        log.warning("store %s cannot be locked (%s): run one render or resume of it at a time", url,
                    "not a local filesystem" if not local else "the filesystem has no file locks")
        yield
        return
    try:
        try:
            # Only the holder truncates: filelock opens the lock file without O_TRUNC (filelock/_unix.py,
            # UnixFileLock._open_lock_file), so a contender that fails to get the flock leaves this record intact.
            with open(lock_file, "w") as handle:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}, handle)
        except OSError as err:
            raise StoreWriteError("the lock holder record", url, err) from err
        yield
    finally:
        # The record goes before the lock: once the lock is free, the file may hold the next writer's record.
        with suppress(OSError):
            os.truncate(lock_file, 0)
        lock.release()


def _read_lock_holder(lock_file: str) -> dict:
    """The holder record in a held lock file, or {} when it is empty, missing or half written."""
    try:
        with open(lock_file) as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def remove_store(url: str) -> None:
    """Delete the job store at `url`. Its write lock lives beside it and is untouched."""
    fs, path, _ = _split_url(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def ensure_empty_location(url: str) -> None:
    """Refuse to create a store over something that is not one (a file, or a directory with content)."""
    fs, path, _ = _split_url(url)
    if not fs.exists(path):
        return
    if not fs.isdir(path):
        raise PathNotWritable("store", url, "a file is in the way")
    if fs.ls(path, detail=False):
        raise PathNotWritable("store", url, "the directory exists, is not empty and is not a Longshot job store")


def check_writable(field: str, url: str, *, directory: bool) -> None:
    """Prove that `url` can be written, by creating (and removing) a probe file where it will go.

    `directory=True`: `url` is a directory (the store) and is created if absent; otherwise `url` is a file
    whose parent directory is created if absent. Raises PathNotWritable.
    """
    fs, path, local = _split_url(url)
    if not directory and fs.exists(path) and fs.isdir(path):
        raise PathNotWritable(field, url, "is a directory")
    if directory and fs.exists(path) and not fs.isdir(path):
        raise PathNotWritable(field, url, "a file is in the way")
    where = path if directory else (path.rsplit("/", 1)[0] if "/" in path else ".")
    probe = f"{where}/.longshot-probe-{uuid.uuid4().hex[:8]}"
    try:
        fs.makedirs(where, exist_ok=True)
        fs.pipe_file(probe, b"probe")
        fs.rm_file(probe)
    except (OSError, PermissionError) as err:
        raise PathNotWritable(field, url, getattr(err, "strerror", None) or str(err)) from None
    if local and not directory and Path(path).exists() and not os.access(path, os.W_OK):
        raise PathNotWritable(field, url, "the existing file is read-only")
