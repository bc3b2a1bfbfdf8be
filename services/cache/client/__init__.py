"""The cache client library every service uses: read-through loads, invalidation,
the near-cache, and the decorator API. The cache itself lives in the sidecar
(services/cache/sidecar); this package only talks to it."""
