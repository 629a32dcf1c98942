"""``meshctl status``: this node — its identity, the controller link, its peers, its routes (from meshd)."""

from __future__ import annotations

import argparse
from typing import Any

from idmesh.cli import print_json

from .connect import meshd, socket_option
from .output import ago, table

__all__ = ["controller_line", "register"]


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = commands.add_parser("status", help="this node: its identity, the controller link, its peers",
                                 description="Ask the local meshd (over its Unix socket) for this node's identity, "
                                 "whether it is connected to the controller, and each peer's endpoint and handshake.")
    socket_option(status)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_status)


def _status(args: argparse.Namespace) -> int:
    status = meshd(args).get("/v1/status")
    if args.json:
        print_json(status)
        return 0
    me, ctl = status["self"], status["controller"]
    print(f"{me['name']}  {' '.join(me['addresses'])}  {me['owner'] or ','.join('tag:' + t for t in me['tags'])}")
    print(controller_line(ctl))
    offset = ctl.get("clock_offset_seconds")
    if offset is not None and abs(offset) > 31:  # CLOCK_SKEW and the 1 s of a Date header (not imported: startup)
        print(f"warning: the controller's clock is {abs(offset):.0f} s {'ahead of' if offset > 0 else 'behind'} "
              "this node's: certificates allow 30 s; set both clocks with NTP")
    pol, agents = status.get("policy", {}), status.get("agents", {})
    print(f"policy version {pol.get('version', 0)}, {pol.get('rules', 0)} rule(s), ruleset "
          f"{(pol.get('ruleset') or '-')[:16]}; agents: {agents.get('local', 0)} here, "
          f"{agents.get('honored', 0)} honored")
    table([[p["name"], " ".join(p["addresses"]), p.get("path", "-"), p["endpoint"] or "-", ago(p["latest_handshake"]),
            str(p["rx_bytes"]), str(p["tx_bytes"]), p.get("last_probe", "-")] for p in status["peers"]],
          ["PEER", "ADDRESSES", "PATH", "ENDPOINT", "HANDSHAKE", "RX", "TX", "LAST PROBE"])
    _routing(status.get("routing") or {})
    return 0


def controller_line(ctl: dict[str, Any]) -> str:
    """``controller https://ctl-2:8443 (2 of 3): connected, netmap version 42``; the place in the list only
    when there are several replicas (an older meshd names none: then it is one)."""
    url, urls = ctl["url"], ctl.get("urls") or [ctl["url"]]
    if url not in urls:  # a replica that left the mesh, streamed from until it fails
        place = f" (not among the {len(urls)} listed)"
    else:
        place = f" ({urls.index(url) + 1} of {len(urls)})" if len(urls) > 1 else ""
    state = "connected" if ctl["connected"] else f"disconnected ({ctl.get('last_error') or 'connecting'})"
    return f"controller {url}{place}: {state}, netmap version {ctl['netmap_version']}"


def _routing(routing: dict[str, Any]) -> None:
    """The gateway this node is, its route tunnels, and the route each of its identities takes."""
    if routing.get("offered"):
        print(f"gateway on {routing['gateway_interface']} for {', '.join(routing['offered'])}; "
              f"clients: {', '.join(routing['clients']) or '-'}")
    if routing.get("tunnels"):
        table([[t["interface"], t["gateway"], "up" if t["up"] else "down"] for t in routing["tunnels"]],
              ["TUNNEL", "GATEWAY", "STATE"])
    if routing.get("routes"):
        up = {t["gateway"]: t["up"] for t in routing["tunnels"]}
        table([[r["identity"], r["prefix"], r["via"] or "-",
                ", ".join(g + ("" if up.get(g) else " (down)") for g in r["gateways"])] for r in routing["routes"]],
              ["IDENTITY", "ROUTE", "VIA", "GATEWAYS IN ORDER"])
