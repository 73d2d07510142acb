"""What signing a message costs: tea_dist's HMAC-SHA256 against Celery's x509 message signing.

For a branch-shaped message with 1 KB, 10 KB and 100 KB of state, the time of one sign plus
one verify (median of many, per message) for:

- ``hmac``: ``tea_dist.distributed.signing.sign`` then ``verify`` (canonical JSON + HMAC).
- ``x509``: Celery's ``SecureSerializer`` (the ``auth`` serializer behind
  ``app.setup_security()``) with an RSA-2048 key and a self-signed certificate: serialize
  (sign) then deserialize (verify). Needs ``cryptography`` (in the ``dev`` extra).
- ``json``: plain JSON dumps + loads of the same message, what every message costs anyway.

Pure CPU in this process: no Redis, no worker. Run: ``python bench/sign_cost.py [--quick]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from collections.abc import Callable
from typing import Any

from bench.common import command_line, median, table
from tea_dist.distributed.signing import sign, verify

SECRET = os.urandom(32)


def message(state_bytes: int) -> dict[str, Any]:
    """A message shaped like a celery branch: ids, a graph description, a state, a config."""
    return {
        "run": "9f" * 16,
        "fanout": "a1" * 16,
        "index": 3,
        "branch": "search_web",
        "fan_in": "merge",
        "graph": {
            "name": "research",
            "nodes": {"search_web": {"run": "examples.nodes:search_web", "fan_in": False}},
            "edges": {"search_web": ["merge"]},
            "conditionals": {},
            "fanouts": {},
            "code": {"tea_dist": "0.1.0", "modules": {"examples.nodes": "0" * 64}},
        },
        "state": {"query": "celery", "blob": "x" * state_bytes},
        "run_config": {},
        "config": {"strategy": "celery", "timeout_seconds": 5.0, "max_retries": 2},
        "dispatched": time.time(),
        "ledger": {"attempts": 0, "errors": [], "first_start": None},
    }


def per_call(sides: dict[str, Callable[[], Any]], budget: float) -> dict[str, float]:
    """Median seconds per call of each side, timed in turn (A, B, C, A, B, C, ...) in batches
    of ~10 ms until ``budget`` seconds have passed, so load hits every side alike."""
    batches = {}
    for name, fn in sides.items():  # calibrate a batch size of about 10 ms per side
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.01:
            fn()
            n += 1
        batches[name] = n
    samples: dict[str, list[float]] = {name: [] for name in sides}
    started = time.perf_counter()
    while time.perf_counter() - started < budget or len(samples[next(iter(sides))]) < 5:
        for name, fn in sides.items():
            t0 = time.perf_counter()
            for _ in range(batches[name]):
                fn()
            samples[name].append((time.perf_counter() - t0) / batches[name])
    return {name: median(values) for name, values in samples.items()}


def hmac_round(msg: dict[str, Any]) -> Callable[[], None]:
    def run() -> None:
        verify(msg, sign(msg, SECRET), SECRET)

    return run


def json_round(msg: dict[str, Any]) -> Callable[[], None]:
    def run() -> None:
        json.loads(json.dumps(msg))

    return run


def x509_round(msg: dict[str, Any]) -> Callable[[], None] | None:
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID
    except ImportError:
        return None
    from celery.security.certificate import Certificate, CertStore
    from celery.security.key import PrivateKey
    from celery.security.serialization import SecureSerializer

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tea-dist-bench")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    store = CertStore()
    store.add_cert(Certificate(cert_pem))
    secure = SecureSerializer(PrivateKey(key_pem), Certificate(cert_pem), store, "sha256")

    def run() -> None:
        secure.deserialize(secure.serialize(msg))

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 s per size instead of 6 s")
    args = parser.parse_args()
    budget = 1.0 if args.quick else 6.0
    rows = []
    for size in (1_000, 10_000, 100_000):
        msg = message(size)
        sides = {"json": json_round(msg), "hmac": hmac_round(msg)}
        x509_fn = x509_round(msg)
        if x509_fn is not None:
            sides["x509"] = x509_fn
        cost = per_call(sides, budget)
        x509 = cost.get("x509")
        rows.append(
            [
                f"{size // 1000} KB state",
                f"{cost['json'] * 1e6:.1f}",
                f"{cost['hmac'] * 1e6:.1f}",
                f"{x509 * 1e6:.1f}" if x509 is not None else "n/a (no cryptography)",
                f"{x509 / cost['hmac']:.1f}x" if x509 is not None else "n/a",
            ]
        )
    header = ["message", "json µs", "hmac µs", "x509 µs", "x509/hmac"]
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(table(f"sign + verify per message (load {load})", header, rows))
    print(command_line())


if __name__ == "__main__":
    main()
