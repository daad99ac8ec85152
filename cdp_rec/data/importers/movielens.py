"""MovieLens ratings with the movies file giving each item's category.

Ratings (the format is told by the file name):

* ``ratings.csv`` (ml-latest, ml-25m, ...): header ``userId,movieId,rating,timestamp``;
* ``ratings.dat`` (ml-1m, ml-10m): ``UserID::MovieID::Rating::Timestamp``;
* ``u.data`` (ml-100k): tab-separated ``user item rating timestamp``.

Movies (``--movies``, default the file beside the ratings): ``movies.csv``
(``movieId,title,genres``, genres ``A|B|C``), ``movies.dat`` (``MovieID::Title::Genres``,
Latin-1) or ``u.item`` (``|``-separated, Latin-1, 19 genre flags in ``u.genre`` order).
The category is one genre string, hashed like any string id: ``--genre first`` (default:
the first genre listed, for ``u.item`` the first flagged) or ``all`` (the whole genre
combination, e.g. ``Animation|Children's|Comedy``). A rated movie missing from the movies
file is an error.

Defaults: ``--positive "rating>=4"``, histories are the positive ratings, no sampled
negatives, ``--split last-fraction`` (MovieLens days are sparse).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cdp_rec.data.importers.common import (
    EventBatch,
    Source,
    check_no_nulls,
    hash_strings,
    iter_csv,
    line_locator,
    parse_int,
    parse_ts,
    parse_value,
    read_header,
)
from cdp_rec.data.loader import DataError

# ml-100k's u.genre, in flag order.
U_ITEM_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                 "War", "Western")
NO_GENRE = "(no genres listed)"
DEFAULTS = {"positive": "rating>=4", "history": "positive", "negatives": 0, "split": "last-fraction"}
_SEP = "\x01"  # a delimiter that never occurs: '::' files are read as lines and split


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(".dat"):
        return "dat"
    if name == "u.data" or name.endswith(".data") or name.startswith("u") and name[1:].split(".")[0].isdigit():
        return "udata"
    raise DataError(f"{path}: unknown MovieLens ratings file (expected ratings.csv, ratings.dat or u.data)")


def default_movies(ratings: Path) -> Path:
    kind = _kind(ratings)
    name = {"csv": "movies.csv", "dat": "movies.dat", "udata": "u.item"}[kind]
    path = ratings.parent / name
    if not path.is_file():
        raise DataError(f"{ratings}: no {name} beside it; give the movies file with --movies")
    return path


def _split_lines(path: Path, rb: pa.RecordBatch, line0: int, n_fields: int, sep: str) -> list[pa.Array]:
    """``'a::b::c'`` lines -> ``n_fields`` string arrays (DataError naming a line with another count)."""
    lines = rb.column(0)
    check_no_nulls(lines, "line", lambda i: f"{path}: line {line0 + i}")
    parts = pc.split_pattern(lines, sep)
    count = pc.list_value_length(parts).to_numpy(zero_copy_only=False)
    bad = count != n_fields
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path}: line {line0 + i}: expected {n_fields} '{sep}'-separated fields, got {count[i]}")
    return [pc.list_element(parts, k) for k in range(n_fields)]


def read_movies(path: Path, genre: str) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """Sorted movie ids, their category hashes and the category strings (per movie)."""
    name = path.name.lower()
    ids: list[np.ndarray] = []
    genres: list[pa.Array] = []
    if name.endswith(".csv"):
        header = read_header(path, ",")
        for col in ("movieId", "genres"):
            if col not in header:
                raise DataError(f"{path}: column '{col}' missing (file has columns {header})")
        for line0, rb in iter_csv(path, None, ["movieId", "genres"], ",", 1 << 24):
            loc = lambda i, l0=line0: f"{path}: line {l0 + i}"  # noqa: E731
            ids.append(parse_int(rb.column("movieId"), "movieId", loc))
            check_no_nulls(rb.column("genres"), "genres", loc)
            genres.append(rb.column("genres"))
    elif name.endswith(".dat"):
        for line0, rb in iter_csv(path, ["line"], ["line"], _SEP, 1 << 24, quoting=False, encoding="latin-1"):
            mid, _, g = _split_lines(path, rb, line0, 3, "::")
            ids.append(parse_int(mid, "MovieID", lambda i, l0=line0: f"{path}: line {l0 + i}"))
            genres.append(g)
    else:  # u.item
        names = ["movie_id", "title", "release", "video_release", "url", *[f"g{k}" for k in range(19)]]
        for line0, rb in iter_csv(path, names, names, "|", 1 << 24, quoting=False, encoding="latin-1"):
            loc = lambda i, l0=line0: f"{path}: line {l0 + i}"  # noqa: E731
            ids.append(parse_int(rb.column("movie_id"), "movie_id", loc))
            flags = np.stack([parse_int(rb.column(f"g{k}"), f"genre flag {k}", loc) for k in range(19)], axis=1)
            out = []
            for row in flags.astype(bool):
                on = [U_ITEM_GENRES[k] for k in np.flatnonzero(row)]
                out.append("|".join(on) if on else NO_GENRE)
            genres.append(pa.array(out, pa.string()))
    mids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    g = pa.concat_arrays([a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a for a in genres]).cast(pa.string())
    if genre == "first":
        g = pc.list_element(pc.split_pattern(g, "|"), 0)
    elif genre != "all":
        raise DataError(f"--genre must be first or all, got {genre!r}")
    g = pc.if_else(pc.equal(pc.utf8_length(g), 0), NO_GENRE, g)
    order = np.argsort(mids, kind="stable")
    mids, g = mids[order], g.take(pa.array(order))
    dup = np.flatnonzero(mids[1:] == mids[:-1])
    if len(dup):
        raise DataError(f"{path}: movie id {mids[dup[0]]} appears more than once")
    return mids, hash_strings(g), g


def source(files: list[Path], movies: Path | None = None, genre: str = "first", block_size: int = 16 << 20) -> Source:
    files = [Path(f) for f in files]
    kinds = {_kind(f) for f in files}
    if len(kinds) != 1:
        raise DataError(f"{[str(f) for f in files]}: mixed MovieLens ratings formats")
    kind = kinds.pop()
    movies_path = Path(movies) if movies else default_movies(files[0])

    def batches() -> Iterator[EventBatch]:
        mids, cat_hash, cat_str = read_movies(movies_path, genre)
        uniq_g = pc.unique(cat_str)
        strings = {"category": (hash_strings(uniq_g), uniq_g)}
        for path in files:
            if kind == "csv":
                header = read_header(path, ",")
                cols = ["userId", "movieId", "rating", "timestamp"]
                for c in cols:
                    if c not in header:
                        raise DataError(f"{path}: column '{c}' missing (file has columns {header})")
                stream = ((l0, [rb.column(c) for c in cols]) for l0, rb in iter_csv(path, None, cols, ",", block_size))
                names, reading = cols, (",", "utf8", True)
            elif kind == "dat":
                names, reading = ["UserID", "MovieID", "Rating", "Timestamp"], (_SEP, "latin-1", False)
                stream = ((l0, _split_lines(path, rb, l0, 4, "::"))
                          for l0, rb in iter_csv(path, ["line"], ["line"], _SEP, block_size, quoting=False,
                                                 encoding="latin-1"))
            else:
                names, reading = ["user_id", "item_id", "rating", "timestamp"], ("\t", "utf8", False)
                stream = ((l0, [rb.column(c) for c in names])
                          for l0, rb in iter_csv(path, names, names, "\t", block_size, quoting=False))
            for line0, (u, m, r, t) in stream:
                locate = line_locator(path, line0, *reading)
                item = parse_int(m, names[1], locate)
                pos = np.minimum(np.searchsorted(mids, item), max(len(mids) - 1, 0))
                missing = (mids[pos] != item) if len(mids) else np.ones(len(item), bool)
                if missing.any():
                    i = int(np.flatnonzero(missing)[0])
                    raise DataError(f"{locate(i)}: column '{names[1]}': movie {item[i]} is not in {movies_path}")
                yield EventBatch(
                    user=parse_int(u, names[0], locate),
                    item=item,
                    category=cat_hash[pos],
                    ts=parse_ts(t, names[3], locate),
                    value=parse_value(r, names[2], locate),
                    locate=locate,
                    strings=strings,
                )

    return Source(format="movielens", files=files, batches=batches, has_value=True, value_names=("rating", "value"),
                  string_roles=("category",), notes={"movies": str(movies_path), "genre_rule": genre})
