"""``cdp-rec import``: real event logs -> the project's Parquet layouts plus a data set spec.

* :mod:`.taobao` -- Taobao UserBehavior CSV;
* :mod:`.movielens` -- MovieLens ``ratings.csv`` / ``ratings.dat`` / ``u.data`` + movies;
* :mod:`.events` -- any CSV / Parquet log with a column mapping;
* :mod:`.common` -- the streaming, bounded-memory pipeline every format shares (rules,
  requests, leak-free histories, sampled negatives, day split, spec);
* :mod:`.export` -- the synthetic generator's logs as an event log (round-trip tests);
* :mod:`.cli` -- the subcommand.

A remapped import fingerprints its id mapping with :mod:`cdp_rec.data.id_maps` (which
serving reads too, to refuse rows numbered by another import's mapping).

Readers never import this package: it writes through :mod:`cdp_rec.data.writer` and
:mod:`cdp_rec.data.joined`'s writers only.
"""
