"""The cache, in one home (docs/cache.md tells the whole model).

client/      what a service links: CacheClient, the one face (@cached, stale, every, encoded),
             the near-cache that follows the sidecar's stream, the guide's CacheManager
sidecar/     the shared cache service: stores (memory, Redis, the fallback between),
             the Watch hub, peers between sidecars
log/         the invalidation log: the outbox a write appends to in its transaction,
             the log's SQL, the relay that brings its entries to the sidecar
edge/        the gateway's cache of HTTP answers and the surrogate keys answers carry
consistency  the checker that samples acknowledged writes and counts stale layers

Nothing outside this package imports below these parts' public modules:
client.{client,decorators,manager,freshness,transport,near_cache}, sidecar.server,
log.{outbox,relay}, edge.{store,surrogate_keys}, consistency.
"""
