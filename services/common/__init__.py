"""What the services share, cut into layers: a module imports from its own layer and the
layers below it, never from one above (tests/test_layers.py checks it; docs/design.md's
"Module map" says what each layer holds).

Layers, bottom to top (the services, the gateway and the cache sidecar sit above them all):

    foundation  services/common/foundation/
    contract    services/common/contract/
    telemetry   services/common/telemetry/
    data        services/common/data/
    transport   services/common/transport/
    cache       services/cache/
    auth        services/common/auth/
    runtime     services/common/runtime/
    usecases    services/common/usecases/
"""
