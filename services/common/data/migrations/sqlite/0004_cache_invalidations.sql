-- The invalidation log (a transactional outbox): every write appends the cache
-- patterns it made stale, in its own transaction; relays deliver them to the cache.
-- AUTOINCREMENT: a seq is never reused, even after pruning. SQLite has one writer at
-- a time, so entries commit in seq order.
CREATE TABLE cache_invalidations (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    patterns TEXT NOT NULL,
    time     TEXT NOT NULL
);
CREATE INDEX cache_invalidations_time ON cache_invalidations (time);
