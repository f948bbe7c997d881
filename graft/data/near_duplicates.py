"""Near-duplicate images: a 64-bit perceptual hash and grouping by Hamming distance.

:func:`perceptual_hash` is a DCT hash (pHash): the image in grey, box-filtered to a 32 x 32
grid, its 8 x 8 lowest 2-D DCT-II frequencies, each bit set when that coefficient is above
their median. Copies that are resized, re-encoded or slightly cropped keep most bits; unrelated
pictures differ in about half of them (32 of 64). Every step after Pillow's integer resize is
exact integer arithmetic on rounded coefficients, so the same pixels give the same bits on
every machine, and a hash always has 32 bits set (or fewer on a blank image), which makes every
distance even.

:func:`group_near_duplicates` joins images whose hashes differ in at most ``max_distance``
bits, transitively (connected components), without comparing all pairs. Candidate pairs come
from a multi-index scheme over the bits (the pigeonhole principle): the 64 bits are dealt into
``m > d`` disjoint blocks; two hashes within ``d`` bits differ in at most ``d`` blocks, so they
agree exactly on at least ``t = m - d`` of them. One table per set of ``t`` blocks, keyed on
those blocks' bits, therefore puts every such pair in a shared bucket of at least one table:
the candidates hold every near pair, so the grouping equals brute force exactly (recall 1, not
a probability). Candidates are then checked with an exact popcount. ``m`` is chosen per call
from the measured bucket sizes, trading the number of tables (``C(m, t)``) against candidates
per table. For 250,000 hashes of photo-like images on 2 cores that takes about 4 s at the
default 8 bits and 15 to 20 s at 10 (benchmarks/ingest.py); the cost keeps growing steeply with
the distance, towards an all-pairs comparison, but well before that (past about 12 bits)
unrelated pictures start to fall within it anyway.

Images smaller than the 32 x 32 grid on a side (icons, the demo's 8 x 8 digit scans) carry too
little detail for the hash to tell a copy from a look-alike: different scans of one digit land
2 to 8 bits apart. :func:`distance_limits` therefore lets them join only identical hashes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from itertools import combinations

import numpy as np
from PIL import Image

HASH_BITS = 64
GRID = 32  # pixels: the image is reduced to GRID x GRID before the DCT
LOW = 8  # the hash keeps the LOW x LOW lowest frequencies: LOW * LOW == HASH_BITS
# Coefficients are rounded to multiples of 2**-20 before they are compared, so float noise of
# a different BLAS (about 1e-12 here) cannot flip a bit; real coefficient gaps are far larger.
_QUANTUM_BITS = 20
# The seeded layout of the 64 bits into blocks. Only the speed depends on it (the pairs found
# are exact whatever the layout); it spreads neighbouring frequencies, whose bits correlate,
# over different blocks so that buckets stay small.
_BLOCK_SEED = 20240613
_MAX_TABLES = 5000  # block counts needing more tables than this are not considered
_CHUNK = 1 << 22  # candidate pairs checked at once: bounds memory in dense buckets
# Relative costs of one table over one hash and of one candidate pair (measured on 2 cores).
_COST_PER_ITEM = 1.0
_COST_PER_CANDIDATE = 1.5


def _dct_rows(size: int, keep: int) -> np.ndarray:
    """The first ``keep`` rows of the orthonormal DCT-II matrix of order ``size``: (keep, size)."""
    frequency = np.arange(keep)[:, None]
    position = np.arange(size)[None, :]
    rows = np.sqrt(2.0 / size) * np.cos(np.pi * (2 * position + 1) * frequency / (2 * size))
    rows[0] /= np.sqrt(2.0)
    return rows


_DCT = _dct_rows(GRID, LOW)


def hash_grids(grids: np.ndarray) -> np.ndarray:
    """The 64-bit hashes of grey ``grids`` (n, 32, 32), values 0-255, as uint64 (n,).

    Bit 63 (the first hex digit's high bit) is frequency (0, 0), then row by row to (7, 7).
    This is :func:`perceptual_hash` after the resize, for many grids at once. Raises
    ValueError when ``grids`` is not (n, 32, 32).
    """
    grids = np.asarray(grids, dtype=np.float64)
    if grids.ndim != 3 or grids.shape[1:] != (GRID, GRID):
        raise ValueError(f"grids must be (n, {GRID}, {GRID}), got {grids.shape}")
    coefficients = (_DCT @ grids @ _DCT.T).reshape(len(grids), HASH_BITS)
    fixed = np.rint(coefficients * (1 << _QUANTUM_BITS)).astype(np.int64)
    ordered = np.sort(fixed, axis=1)
    twice_median = ordered[:, HASH_BITS // 2 - 1] + ordered[:, HASH_BITS // 2]
    bits = 2 * fixed > twice_median[:, None]  # strictly above: ties (blank images) are 0
    return np.packbits(bits, axis=1).view(">u8").ravel().astype(np.uint64)


def perceptual_hash(image: Image.Image) -> str:
    """The 64-bit DCT perceptual hash of ``image`` (any size and mode) as 16 hex digits.

    The image is converted to grey and box-filtered (each grid cell the mean of the pixels it
    covers; small images are enlarged) to 32 x 32 pixels. 0.3 to 0.5 ms for a 500 x 375 RGB
    image and about 30 ms for 12 megapixels: Pillow's conversion and resize, which grow with
    the pixel count, take most of it.
    """
    grid = image.convert("L").resize((GRID, GRID), Image.Resampling.BOX)
    return f"{int(hash_grids(np.asarray(grid)[None])[0]):016x}"


def hash_values(hashes: Sequence[str] | np.ndarray) -> np.ndarray:
    """Hex hashes (16 digits each, as :func:`perceptual_hash` writes them) or an array of
    integers, as uint64 (n,). Raises ValueError on a string that is not hex."""
    if isinstance(hashes, np.ndarray) and hashes.dtype.kind in "iu":
        return hashes.astype(np.uint64)
    return np.array([int(h, 16) for h in hashes], dtype=np.uint64)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits in which the uint64 hashes ``a`` and ``b`` differ, element by element (0-64)."""
    return np.bitwise_count(np.bitwise_xor(a, b)).astype(np.int64)


def distance_limits(
    widths: np.ndarray | Sequence[int], heights: np.ndarray | Sequence[int], max_distance: int
) -> np.ndarray:
    """Each image's own ``max_distance``: the setting for images at least 32 px on both sides,
    0 (identical hashes only) for smaller ones, whose hashes cannot tell copies from
    look-alikes. ``widths`` and ``heights`` are in pixels; returns int64 (n,)."""
    smaller = np.minimum(np.asarray(widths, dtype=np.int64), np.asarray(heights, dtype=np.int64))
    return np.where(smaller >= GRID, max_distance, 0).astype(np.int64)


def group_near_duplicates(
    hashes: Sequence[str] | np.ndarray, max_distance: int | np.ndarray
) -> np.ndarray:
    """Near-duplicate groups: for each hash, the index of the first hash of its group (n,).

    Two hashes are joined when they differ in at most ``max_distance`` bits (an int, or one
    per hash: then a pair needs its distance within both hashes' limits); groups are the
    transitive closure (connected components), and equal hashes are always joined. A hash
    alone is its own group. The result depends only on the hashes, the limits and their order,
    and equals an all-pairs comparison exactly (see the module's docstring for how it avoids
    one). Raises ValueError on a negative limit or a limit array of the wrong length.
    """
    values = hash_values(hashes)
    limits = np.broadcast_to(np.asarray(max_distance, dtype=np.int64), values.shape)
    if limits.size and limits.min() < 0:
        raise ValueError(f"max_distance must be at least 0, got {limits.min()}")
    distinct, inverse = np.unique(values, return_inverse=True)
    # Equal hashes are one node; its limit is its most lenient item's, since an identical
    # item joins whatever that one joins.
    node_limits = np.zeros(len(distinct), dtype=np.int64)
    np.maximum.at(node_limits, inverse, limits)
    labels = _components(distinct, node_limits)[inverse]
    first = np.full(labels.max() + 1 if len(labels) else 0, len(labels), dtype=np.int64)
    np.minimum.at(first, labels, np.arange(len(labels)))
    return first[labels]


def _components(values: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """Component label of each distinct hash in ``values`` (uint64, unique) when hashes ``i``
    and ``j`` within ``min(limits[i], limits[j])`` bits are joined: the component's smallest
    index."""
    labels = np.arange(len(values))
    searched = np.flatnonzero(limits > 0)  # limit 0: only identical hashes, already one node
    if len(searched) < 2:
        return labels
    values, limits = values[searched], limits[searched]
    # One limit for all (the usual case) is compared as a number, not gathered per pair.
    uniform = int(limits[0]) if (limits == limits[0]).all() else None
    found = np.arange(len(values))  # component labels among the searched hashes
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    waiting = 0
    for keys, index in _tables(values, int(limits.max())):
        ordered = values[index]
        for left, right in _bucket_pairs(keys):
            distance = hamming(ordered[left], ordered[right])
            if uniform is None:
                near = distance <= np.minimum(limits[index[left]], limits[index[right]])
            else:
                near = distance <= uniform
            a, b = index[left[near]], index[right[near]]
            apart = found[a] != found[b]  # a pair already in one component adds nothing
            pending.append((a[apart], b[apart]))
            waiting += int(apart.sum())
        # Merging costs a pass over every hash, so edges wait until there are enough of them.
        if waiting > max(1024, len(values) // 16):
            found, pending, waiting = _merge(found, pending), [], 0
    if waiting:
        found = _merge(found, pending)
    labels[searched] = searched[found]
    return labels


def _merge(labels: np.ndarray, edges: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Component labels (each the component's smallest index) after adding ``edges`` (index
    pairs) to the components that ``labels`` describes."""
    # Imported here: ingest's verification workers import this module for the hash only, and
    # importing scipy would cost each of them a few hundred milliseconds.
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(labels)
    rows = np.concatenate([np.arange(n), *(a for a, _ in edges)])
    cols = np.concatenate([labels, *(b for _, b in edges)])
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    smallest = np.full(component.max() + 1, n, dtype=np.int64)
    np.minimum.at(smallest, component, np.arange(n))
    return smallest[component]


def _permute_bits(values: np.ndarray) -> np.ndarray:
    """``values`` with their 64 bits moved by a fixed seeded permutation, so that blocks of
    neighbouring bits of the result hold bits from all over the DCT."""
    order = np.random.default_rng(_BLOCK_SEED).permutation(HASH_BITS)
    permuted = np.zeros_like(values)
    one = np.uint64(1)
    for target, source in enumerate(order):
        bit = (values >> np.uint64(source)) & one
        permuted |= bit << np.uint64(target)
    return permuted


def _split_blocks(permuted: np.ndarray, blocks: int) -> list[tuple[np.ndarray, int]]:
    """The ``blocks`` contiguous blocks of the bit-permuted hashes: (values, bits) of each."""
    sizes = [HASH_BITS // blocks + (j < HASH_BITS % blocks) for j in range(blocks)]
    found, start = [], 0
    for size in sizes:
        found.append(((permuted >> np.uint64(start)) & np.uint64((1 << size) - 1), size))
        start += size
    return found


def _tables(values: np.ndarray, distance: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The multi-index tables for ``values`` (uint64, unique) at ``distance`` (>= 1 bit): per
    table, its sorted keys and the index of the hash behind each. Equal keys are the table's
    candidate pairs; every pair within ``distance`` shares a key in some table (the pigeonhole
    principle over blocks, see the module's docstring)."""
    index_bits = max(1, (len(values) - 1).bit_length())
    room = HASH_BITS - index_bits  # key bits that fit beside the index in one uint64
    index = np.arange(len(values), dtype=np.uint64)
    permuted = _permute_bits(values)
    best: tuple[float, list[list[tuple[np.ndarray, int]]]] | None = None
    for count in range(distance + 1, HASH_BITS + 1):
        agree = count - distance
        tables = math.comb(count, agree)  # grows with count, and so does this lower bound:
        floor = tables * len(values) * _COST_PER_ITEM  # once above the best, stop looking
        if best is not None and (tables > _MAX_TABLES or floor >= best[0]):
            break
        subsets = [list(s) for s in combinations(_split_blocks(permuted, count), agree)]
        # The first two tables' candidates estimate every table's: the blocks are alike.
        sample = [_sorted_table(subset, room, index, index_bits)[0] for subset in subsets[:2]]
        candidates = np.mean([_collisions(keys) for keys in sample])
        cost = floor + tables * float(candidates) * _COST_PER_CANDIDATE
        if best is None or cost < best[0]:
            best = (cost, subsets)
    assert best is not None  # the first block count is always tried
    for subset in best[1]:
        yield _sorted_table(subset, room, index, index_bits)


def _sorted_table(
    blocks: list[tuple[np.ndarray, int]], room: int, index: np.ndarray, index_bits: int
) -> tuple[np.ndarray, np.ndarray]:
    """One table: the keys (the ``blocks``' bits concatenated, cut to the ``room`` highest when
    longer: a shorter key only adds candidates, never loses one), sorted, and the ``index``
    of each key's hash."""
    keys = np.zeros_like(index)
    width = 0
    for block, size in blocks:
        keys = (keys << np.uint64(size)) | block
        width += size
    keys >>= np.uint64(max(0, width - room))
    # One sort of key and index packed together: several times faster than an argsort.
    packed = np.sort((keys << np.uint64(index_bits)) | index)
    order = (packed & np.uint64((1 << index_bits) - 1)).astype(np.int64)
    return packed >> np.uint64(index_bits), order


def _collisions(keys: np.ndarray) -> int:
    """Pairs of equal values in the sorted ``keys``: the candidates of that table."""
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    sizes = np.diff(np.r_[starts, len(keys)])
    return int((sizes * (sizes - 1) // 2).sum())


def _bucket_pairs(keys: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every pair of positions ``(i, j)``, ``i < j``, with ``keys[i] == keys[j]`` (``keys``
    sorted), once each, in chunks of about ``_CHUNK`` pairs so that memory stays bounded."""
    # Only positions in buckets of two or more matter, usually few: work on those alone.
    repeats = np.flatnonzero(keys[1:] == keys[:-1])  # position i equals position i + 1
    if not len(repeats):
        return
    breaks = np.diff(repeats) > 1
    starts = repeats[np.r_[True, breaks]]
    ends = repeats[np.r_[breaks, True]] + 2  # one past each bucket's last position
    sizes = ends - starts
    first = np.repeat(np.cumsum(sizes) - sizes, sizes)
    positions = np.repeat(starts, sizes) + np.arange(len(first)) - first
    partners = np.repeat(ends, sizes) - positions - 1  # the later positions of its bucket
    total = np.cumsum(partners)
    cut = 0
    while cut < len(positions) and (done := int(total[cut - 1]) if cut else 0) < total[-1]:
        stop = max(cut + 1, int(np.searchsorted(total, done + _CHUNK, side="right")))
        counts = partners[cut:stop]
        # Position p's partners are p + 1, p + 2, ...: a running count, restarted per p.
        restart = np.repeat(positions[cut:stop] + 1 - (np.cumsum(counts) - counts), counts)
        yield np.repeat(positions[cut:stop], counts), restart + np.arange(len(restart))
        cut = stop
