"""The test OpenID provider's costs: how long ``node provider.mjs`` takes to say ``ready`` (paid once per
test session), and one whole device flow with the Python person (device authorization request, the
person's pages, one token request; no polling wait: the person approves before the device polls).

    .venv/bin/python bench/bench_oidc.py [--starts 5] [--flows 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import command_line

from tests.oidc import DEVICE_CODE_GRANT, OidcProvider, missing_prerequisites, start_oidc_provider


def one_flow(provider: OidcProvider) -> tuple[float, float, float]:
    """Seconds spent in: the device authorization request, the person's approval, the token request."""
    client = provider.confidential
    with provider.http() as http:
        t0 = time.perf_counter()
        grant = http.post(f"{provider.issuer}/device/auth", data={"scope": "openid email"}, auth=client.auth).json()
        t1 = time.perf_counter()
        provider.approve(grant["verification_uri_complete"], login="nikita@acme.com")
        t2 = time.perf_counter()
        tokens = http.post(f"{provider.issuer}/token", auth=client.auth,
                           data={"grant_type": DEVICE_CODE_GRANT, "device_code": grant["device_code"]})
        t3 = time.perf_counter()
    if "id_token" not in tokens.json():
        raise SystemExit(f"no id_token: {tokens.text}")
    return t1 - t0, t2 - t1, t3 - t2


def ms(values: list[float]) -> str:
    return f"median {statistics.median(values) * 1000:.0f} ms (min {min(values) * 1000:.0f}, max {max(values) * 1000:.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--flows", type=int, default=30)
    args = parser.parse_args()
    print(f"$ {command_line()}")
    if missing := missing_prerequisites():
        raise SystemExit("; ".join(missing))
    with tempfile.TemporaryDirectory(prefix="bench-oidc-") as tmp:
        starts = []
        for i in range(args.starts):
            with start_oidc_provider(Path(tmp) / f"start{i}") as provider:
                starts.append(provider.startup_seconds)
        print(f"provider start to 'ready' (node + oidc-provider + a 2048-bit RSA key), {args.starts} starts: {ms(starts)}")
        with start_oidc_provider(Path(tmp) / "flows") as provider:
            one_flow(provider)  # warm-up: first TLS handshakes, JIT
            parts = [one_flow(provider) for _ in range(args.flows)]
    totals = [sum(p) for p in parts]
    print(f"one device flow, {args.flows} flows: {ms(totals)}")
    print(f"  device authorization request: {ms([p[0] for p in parts])}")
    print(f"  the person (pages, forms, sign-in, consent): {ms([p[1] for p in parts])}")
    print(f"  token request: {ms([p[2] for p in parts])}")
    print("a device that polls at the provider's interval (1 s in the test settings) adds up to 1 s to this")


if __name__ == "__main__":
    main()
