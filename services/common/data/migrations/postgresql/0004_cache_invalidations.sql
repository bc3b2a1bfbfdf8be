-- The invalidation log (a transactional outbox): every write appends the cache
-- patterns it made stale, in its own transaction; relays deliver them to the cache.
-- seq comes from a sequence (never reused, even after pruning) and is taken under an
-- advisory lock held to the commit, so entries commit in seq order.
CREATE TABLE cache_invalidations (
    seq      BIGSERIAL PRIMARY KEY,
    patterns TEXT NOT NULL,
    time     TIMESTAMPTZ NOT NULL
);
CREATE INDEX cache_invalidations_time ON cache_invalidations (time);
