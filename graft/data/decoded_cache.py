"""A decoded-image cache: each image decoded and resized once, read through memory maps.

What: every accepted image, keyed by the sha256 of its file's bytes, decoded by
:func:`graft.data.decoding.decode_square` to ``size`` x ``size`` RGB and stored as uint8, CHW.
Training and evaluation stages read batches straight from the stored arrays.

Why: decoding a whole split into one in-memory tensor on every run costs time and memory that
grows with the dataset. Memory-mapped pages are file-backed: the kernel drops them under
pressure instead of swapping, and processes reading the same folder share them. So a run's
anonymous memory stays bounded whatever the dataset's size (the index below is ~40 bytes an
image), and DataLoader workers read without copying the dataset.

Layout: ``<root>/<size>px-<key>/`` holds the entries made under one set of decode settings.
``key`` digests everything that can change decoded pixels: the size, :data:`DECODER_VERSION`
(bumped whenever ``decode_square`` changes) and the Pillow and pillow-heif versions (a new
release may decode or resize differently). Entries made under other settings live in another
folder, so they are never read. Inside, images are stored in segments of at most
:data:`SEGMENT_BYTES` of pixels:

* ``<id>.npy``: NPY format, uint8, shape (n, 3, size, size);
* ``<id>.keys``: the n raw 32-byte sha256 digests, in row order;

``<id>`` is a digest of the ``.keys`` content, so two writers of the same segment name it the
same. A ``.lock`` file serialises builders.

Atomicity: a segment is written to temporaries in the same folder,
``.<id>.{keys,npy}.tmp-<pid>-<host>``, filled, flushed, and renamed ``.keys`` first and
``.npy`` last. The ``.npy`` appearing is the commit point: readers only consider segments whose
``.npy`` exists, is whole (its size matches its header) and whose ``.keys`` holds one digest a
row and digests to ``<id>``. A writer killed at any instant leaves at most temporaries, which no
reader looks at; the next build removes those whose writer (a process on this machine) is no
longer running.

Concurrency: builders take ``.lock`` (a :class:`filelock.FileLock`) and re-read the index under
it, so two stages or processes building at once never decode an image twice; should two ever
race past it, they write identical segments and either copy is read. Readers take no lock:
committed segments never change, and any number of processes may map them read-only.

Nothing is deleted automatically. The whole cache folder (``root``) is safe to delete at any
time no stage is running: it is rebuilt from the images on the next build.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import itertools
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL
from filelock import FileLock

from graft.data.decoding import decode_square
from graft.errors import GraftError
from graft.processes import HOST_TAG, process_running
from graft.progress import Progress

if TYPE_CHECKING:
    import torch

DECODER_VERSION = 1  # bump whenever decode_square's pixels change: old entries are then unread
SEGMENT_BYTES = 256 * 2**20  # most pixel bytes in one segment (~1,780 images at 224 px)

_DIGEST = np.dtype("S32")  # a raw sha256; fixed width, so numpy sorts it bytewise
_ID_CHARS = 24  # hex digits of a segment's id: 96 bits, no collision among a cache's segments
_SEGMENT = re.compile(rf"([0-9a-f]{{{_ID_CHARS}}})\.npy")
_TEMPORARY = re.compile(rf"\.[0-9a-f]{{{_ID_CHARS}}}\.(?:npy|keys)\.tmp-(\d+)-([0-9a-f]{{8}})")


def settings_key(size: int) -> str:
    """A short digest (12 hex digits) of every setting that can change decoded pixels.

    ``size`` is in pixels; the rest is :data:`DECODER_VERSION` and the Pillow and pillow-heif
    versions of this environment, read at each call.
    """
    try:
        heif = importlib.metadata.version("pillow-heif")
    except importlib.metadata.PackageNotFoundError:
        heif = "none"
    text = f"size={size}:decoder={DECODER_VERSION}:pillow={PIL.__version__}:pillow-heif={heif}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class DecodedCache:
    """The decoded images of one size, under ``root`` (see the module's docstring).

    ``size`` is the side of the square images, in pixels; ValueError when below 1. Nothing is
    read or created until :meth:`build` or :meth:`open`.
    """

    def __init__(self, root: Path, size: int) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1 pixel, got {size}")
        self.size = size
        self.folder = root / f"{size}px-{settings_key(size)}"

    def build(
        self,
        sha256s: Sequence[str],
        read: Callable[[str], bytes],
        *,
        workers: int = 0,
        progress: str | None = None,
    ) -> int:
        """Decode and store those of ``sha256s`` (hex digests) not stored yet; return how many.

        ``read(sha)`` returns the bytes of the image file whose sha256 is ``sha`` (lowercase
        hex); it is called from ``workers`` threads at once (0: one per core this process may
        use), so it must be thread-safe, and whatever it raises is raised here. Each blob's
        sha256 is checked against its key. ``progress``, when given, names a progress bar (or
        log lines). Duplicates in ``sha256s`` count once. Blocks while another builder holds
        the folder's lock. Segments finished before a failure stay stored.

        Raises GraftError naming the image when a blob does not match its sha256 (the store
        holding it is corrupted) or cannot be decoded; ValueError when a key is not 64 hex
        digits or ``workers`` is negative; OSError when the folder cannot be written.
        """
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        wanted = sorted({sha.lower() for sha in sha256s})  # hex order is byte order
        digests = _digests(wanted)
        self.folder.mkdir(parents=True, exist_ok=True)
        with FileLock(self.folder / ".lock"):
            _remove_stale_temporaries(self.folder)
            # Re-read under the lock: a builder that held it before us may have stored some.
            found = _read_index(self.folder, self.size).locate(digests)
            missing = [sha for sha, at in zip(wanted, found, strict=True) if at < 0]
            if missing:
                self._decode(missing, read, workers or _cores(), progress)
        return len(missing)

    def open(self, sha256s: Sequence[str]) -> CachedImages:
        """The stored images of ``sha256s`` (hex digests), position i being ``sha256s[i]``.

        Duplicates are allowed. Raises GraftError when any is not stored (build first), and
        ValueError when a key is not 64 hex digits.
        """
        shas = list(sha256s)  # by position, whatever sequence (a pandas Series indexes by label)
        index = _read_index(self.folder, self.size)
        found = index.locate(_digests(shas))
        absent = np.flatnonzero(found < 0)
        if absent.size:
            unknown = sorted({shas[int(i)].lower() for i in absent})
            raise GraftError(
                f"{len(unknown)} images are not in the decoded cache {self.folder} (first: "
                f"{unknown[0]}); build it for them first (DecodedCache.build)"
            )
        # Keep only the segments these images use: fewer to pickle and to map.
        used, segment = np.unique(index.segment[found], return_inverse=True)
        names = [index.segments[int(number)] for number in used]
        return CachedImages(
            self.folder, self.size, names, segment.astype(np.uint32), index.row[found]
        )

    def _decode(
        self, missing: list[str], read: Callable[[str], bytes], workers: int, what: str | None
    ) -> None:
        per_segment = max(1, SEGMENT_BYTES // (3 * self.size * self.size))
        bar = Progress(len(missing), what) if what is not None else nullcontext()
        with bar as counter, ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
            for start in range(0, len(missing), per_segment):
                shas = missing[start : start + per_segment]
                self._write_segment(shas, read, pool, 2 * workers, counter)

    def _write_segment(
        self,
        shas: list[str],
        read: Callable[[str], bytes],
        pool: ThreadPoolExecutor,
        window: int,
        counter: Progress | None,
    ) -> None:
        """Decode ``shas`` into one committed segment (see the module docstring's atomicity)."""
        digests = [bytes.fromhex(sha) for sha in shas]
        keys = b"".join(digests)
        name = hashlib.sha256(keys).hexdigest()[:_ID_CHARS]
        suffix = f"tmp-{os.getpid()}-{HOST_TAG}"
        keys_tmp = self.folder / f".{name}.keys.{suffix}"
        pixels_tmp = self.folder / f".{name}.npy.{suffix}"
        try:
            with keys_tmp.open("wb") as stream:
                stream.write(keys)
                stream.flush()
                os.fsync(stream.fileno())
            tasks = [
                (sha, digest, read, self.size) for sha, digest in zip(shas, digests, strict=True)
            ]
            self._fill(pixels_tmp, tasks, pool, window, counter)
            os.replace(keys_tmp, self.folder / f"{name}.keys")
            os.replace(pixels_tmp, self.folder / f"{name}.npy")  # the commit point
        except BaseException:
            keys_tmp.unlink(missing_ok=True)
            pixels_tmp.unlink(missing_ok=True)
            raise

    def _fill(
        self,
        path: Path,
        tasks: list[_Task],
        pool: ThreadPoolExecutor,
        window: int,
        counter: Progress | None,
    ) -> None:
        """Create the NPY file ``path`` and decode ``tasks`` into its rows, flushed to disk."""
        # Rows go straight into the file's pages: building holds no segment in memory.
        shape = (len(tasks), 3, self.size, self.size)
        pixels = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)

        def store(row: int, image: np.ndarray) -> None:
            pixels[row] = image.transpose(2, 0, 1)  # HWC -> CHW: batches need no permute
            if counter is not None:
                counter.update()

        _decode_rows(tasks, pool, window, store)
        pixels.flush()  # msync: the pixels are on disk before the rename commits them


class CachedImages:
    """Stored images by position: position i is the i-th sha256 given to
    :meth:`DecodedCache.open`.

    Picklable, for DataLoader workers: segments are memory-mapped lazily, read-only, once per
    process (a pickle carries none). Reading needs the cache folder to stay in place.
    """

    def __init__(
        self,
        folder: Path,
        size: int,
        segments: Sequence[str],
        segment: np.ndarray,
        row: np.ndarray,
    ) -> None:
        self.folder, self.size = folder, size
        self._segments = tuple(segments)  # ids, indexed by the numbers in ``segment``
        self._segment, self._row = segment, row  # (len,) each: where position i is stored
        self._maps: dict[int, np.ndarray] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._segment)

    def gather(self, positions: Sequence[int] | np.ndarray) -> torch.Tensor:
        """The images at ``positions``, in that order: a uint8 tensor (B, 3, size, size), RGB.

        ``positions`` is 1-D (numpy's rules: negative ones count from the end). Raises
        IndexError when one is out of range, ValueError when not 1-D, and OSError when a
        segment cannot be mapped (the cache folder was deleted).
        """
        import torch  # here, not at import: building needs no torch, and it is slow to import

        at = np.asarray(positions, dtype=np.intp)
        if at.ndim != 1:
            raise ValueError(f"positions must be 1-D, got shape {at.shape}")
        segment, row = self._segment[at], self._row[at]
        batch = np.empty((len(at), 3, self.size, self.size), dtype=np.uint8)
        # By segment, then row: one fancy index per segment, reading its file front to back.
        order = np.lexsort((row, segment))
        starts = np.flatnonzero(np.diff(segment[order])) + 1
        for group in np.split(order, starts):
            if group.size:
                batch[group] = self._map(int(segment[group[0]]))[row[group]]
        return torch.from_numpy(batch)

    def _map(self, number: int) -> np.ndarray:
        if self._pid != os.getpid():  # a forked worker: map afresh rather than share
            self._maps, self._pid = {}, os.getpid()
        mapped = self._maps.get(number)
        if mapped is None:
            path = self.folder / f"{self._segments[number]}.npy"
            mapped = self._maps[number] = np.load(path, mmap_mode="r")
        return mapped

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = {}  # maps do not travel: each process opens its own
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()


@dataclass(frozen=True)
class _Index:
    """Every committed image of a folder: (N,) arrays sorted by digest."""

    segments: tuple[str, ...]  # segment ids; a segment number indexes this
    digests: np.ndarray  # S32, sorted
    segment: np.ndarray  # uint32
    row: np.ndarray  # uint32

    def locate(self, wanted: np.ndarray) -> np.ndarray:
        """For each of ``wanted`` (S32), its index in the arrays, or -1 when not stored."""
        if not len(self.digests):
            return np.full(len(wanted), -1, dtype=np.intp)
        at = np.searchsorted(self.digests, wanted)
        inside = np.minimum(at, len(self.digests) - 1)
        return np.where(self.digests[inside] == wanted, inside, -1)


def _read_index(folder: Path, size: int) -> _Index:
    """The committed segments of ``folder`` (none when it does not exist), as one index."""
    names: list[str] = []
    digests: list[np.ndarray] = []
    try:
        entries = sorted(entry.name for entry in os.scandir(folder))
    except FileNotFoundError:
        entries = []
    for entry in entries:
        found = _SEGMENT.fullmatch(entry)
        keys = _committed_keys(folder, found.group(1), size) if found else None
        if found and keys is not None:
            names.append(found.group(1))
            digests.append(keys)
    if not digests:
        empty = np.empty(0, dtype=np.uint32)
        return _Index((), np.empty(0, dtype=_DIGEST), empty, empty)
    segment = np.concatenate(
        [np.full(len(keys), number, dtype=np.uint32) for number, keys in enumerate(digests)]
    )
    row = np.concatenate([np.arange(len(keys), dtype=np.uint32) for keys in digests])
    every = np.concatenate(digests)
    order = np.argsort(every, kind="stable")
    return _Index(tuple(names), every[order], segment[order], row[order])


def _committed_keys(folder: Path, name: str, size: int) -> np.ndarray | None:
    """Segment ``name``'s digests (S32, row order), or None unless it is whole and committed.

    Whole: the ``.npy`` is uint8 (n, 3, size, size) in C order and as long as its header says;
    the ``.keys`` holds n digests and they digest to ``name``. A segment failing any of these
    (a file truncated by a crash of the machine, one edited by hand) is ignored, and rewritten
    by the next build that needs its images.
    """
    rows = _rows(folder / f"{name}.npy", size)
    try:
        keys = (folder / f"{name}.keys").read_bytes()
    except FileNotFoundError:
        return None
    if rows is None or len(keys) != rows * _DIGEST.itemsize:
        return None
    if hashlib.sha256(keys).hexdigest()[:_ID_CHARS] != name:
        return None
    return np.frombuffer(keys, dtype=_DIGEST)


def _rows(path: Path, size: int) -> int | None:
    """The number of images in the segment file ``path``, or None when it is not whole."""
    try:
        with path.open("rb") as stream:
            version = np.lib.format.read_magic(stream)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
            else:
                return None
            data_starts = stream.tell()
            length = os.fstat(stream.fileno()).st_size
    except (OSError, ValueError):
        return None
    if dtype != np.uint8 or fortran or len(shape) != 4 or tuple(shape[1:]) != (3, size, size):
        return None
    rows = int(shape[0])
    return rows if rows > 0 and length == data_starts + rows * 3 * size * size else None


_Task = tuple[str, bytes, Callable[[str], bytes], int]  # sha, its digest, read, size


def _decode_rows(
    tasks: list[_Task],
    pool: ThreadPoolExecutor,
    window: int,
    store: Callable[[int, np.ndarray], None],
) -> None:
    """Decode ``tasks`` on ``pool`` and ``store(row, image)`` each as it completes.

    At most ``window`` are in flight or done but not stored, which bounds memory whatever
    the number of tasks. What a task raises is raised here; those not started are cancelled.
    """
    rows = iter(range(len(tasks)))
    pending: dict[Future[np.ndarray], int] = {}
    try:
        while True:
            for row in itertools.islice(rows, max(0, window - len(pending))):
                pending[pool.submit(_decode_one, *tasks[row])] = row
            if not pending:
                return
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                store(pending.pop(future), future.result())
    finally:
        for future in pending:
            future.cancel()


def _decode_one(sha: str, digest: bytes, read: Callable[[str], bytes], size: int) -> np.ndarray:
    data = read(sha)
    # A corrupted store must never be trained on silently: check every blob against its key.
    if hashlib.sha256(data).digest() != digest:
        raise GraftError(
            f"image {sha}: its bytes do not match its sha256 (the image store is corrupted)"
        )
    try:
        return decode_square(data, size)
    except Exception as error:  # any decoder's error: name the image
        raise GraftError(
            f"image {sha} cannot be decoded ({type(error).__name__}: {error})"
        ) from error


def _digests(sha256s: Sequence[str]) -> np.ndarray:
    """``sha256s`` (hex) as raw digests, (len,) S32; ValueError when one is not a sha256."""
    raw = []
    for sha in sha256s:
        digest = bytes.fromhex(sha) if len(sha) == 64 else b""
        if len(digest) != 32:
            raise ValueError(f"not a sha256 (64 hex digits): {sha!r}")
        raw.append(digest)
    return np.array(raw, dtype=_DIGEST) if raw else np.empty(0, dtype=_DIGEST)


def _remove_stale_temporaries(folder: Path) -> None:
    """Remove the temporaries of writers on this machine that are no longer running.

    Called under the lock. Errors while removing are ignored: another may be removing it.
    """
    with os.scandir(folder) as entries:
        for entry in entries:
            found = _TEMPORARY.fullmatch(entry.name)
            if found and found.group(2) == HOST_TAG and not process_running(int(found.group(1))):
                Path(entry.path).unlink(missing_ok=True)


def _cores() -> int:
    """The number of cores this process may run on (at least 1)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
