#!/usr/bin/env python3
"""Tiny grpc.health.v1 probe for container healthchecks (a stand-in for grpc-health-probe, which is not on PyPI).

    python grpc_health_check.py ADDRESS [SERVICE]

ADDRESS is host:port (e.g. localhost:50052); SERVICE is the name passed to Health/Check ('' = the whole server,
which every Mirador service flips to SERVING once its model is loaded). Exits 0 if the answer is SERVING, 1 on any
other status, an RPC error or no answer within 3 s, and 2 on bad usage.
"""

from __future__ import annotations

import sys

TIMEOUT_S = 3.0


def check(address: str, service: str = "", timeout_s: float = TIMEOUT_S) -> tuple[bool, str]:
    """(serving, what to print) for one Health/Check call."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as e:
            return False, f"{address}: {e.code().name}: {e.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    return (
        resp.status == health_pb2.HealthCheckResponse.SERVING,
        f"{address} {service or '(server)'}: {status}",
    )


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2) or argv[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    ok, msg = check(argv[0], argv[1] if len(argv) == 2 else "")
    print(msg, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
