"""Container health checks without extra binaries (docker-compose uses it; Kubernetes
probes gRPC and HTTP natively).

    python healthcheck.py grpc 127.0.0.1:50051     grpc.health.v1 Check says SERVING
    python healthcheck.py http http://127.0.0.1:8100/health/ready   HTTP 200

Exits 0 when healthy, 1 otherwise, printing why.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

TIMEOUT = 3.0


def check_grpc(target: str) -> str | None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        except grpc.RpcError as exc:
            return f"{target}: {exc.code().name}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"{target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


def check_http(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            return None if response.status == 200 else f"{url}: HTTP {response.status}"
    except (urllib.error.URLError, OSError) as exc:
        return f"{url}: {exc}"


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in ("grpc", "http"):
        print(__doc__, file=sys.stderr)
        return 2
    problem = check_grpc(argv[2]) if argv[1] == "grpc" else check_http(argv[2])
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
