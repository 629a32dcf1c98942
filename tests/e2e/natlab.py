"""A NAT lab for end-to-end tests: an "internet", a public host, and homes behind NAT routers.

Layout of ``NatLab(homes=2, hosts_per_home=1)`` (every name carries the test
process's PID and a counter, like :mod:`tests.e2e.netns`, whose cleanup and
:func:`~tests.e2e.netns.reap_stale` it reuses)::

    idm-<pid>-<n>-inet     the internet: bridge br0, 203.0.113.0/24, nothing else
    idm-<pid>-<n>-pub      the public host: eth0 203.0.113.10 (controller, STUN, coturn run here)
    idm-<pid>-<n>-r1       home 1's router: wan 203.0.113.101 on the internet,
                           bridge lan 10.1.0.1/24 (the home's LAN), forwarding on,
                           table ip natlab (the NAT behaviour, see below)
    idm-<pid>-<n>-r1h1     a host at home: eth0 10.1.0.11/24, default route via 10.1.0.1
    idm-<pid>-<n>-r2 ...   home 2: wan 203.0.113.102, lan 10.2.0.0/24, hosts 10.2.0.11, ...

The LANs are 10.<home>.0.0/24, outside the overlay's 100.64.0.0/10. The
underlay is IPv4 only (link-local IPv6 aside): the overlay's IPv6 rides
inside WireGuard and does not care. The public host and every router have a
route to each home's LAN through that home's router, so an ``"open"`` router
(plain routing) makes its LAN reachable; behind a NAT those routes lead only
to the router's filter, which drops what was not asked for. The routers have
no default route: a packet to an address outside the lab finds no route and
never leaves the machine.

NAT behaviours (``Router.set_nat(kind)``, switchable at run time; one
atomic nftables batch replaces the table ``ip natlab`` of the router, and
the router's conntrack is flushed so the new behaviour holds for every flow):

``"eim"``  endpoint-independent mapping, address-and-port-dependent filtering
    (a "port-restricted cone"). UDP from LAN host *j* gets the public port
    ``lan_port ^ mask(epoch, j)``: the same public ip:port for one LAN
    ip:port whatever the destination, distinct for two LAN hosts that use the
    same port, and different after a :meth:`Router.reboot` (new epoch). A
    dynamic map ``eim`` (public port -> LAN ip . port, timeout 300 s,
    refreshed by every outgoing packet in a filter chain just before source
    NAT) DNATs packets that arrive for a live mapping to its LAN host, so that
    they never create a conntrack entry on the router itself that would clash
    with the mapping; the forward chain then lets in only replies (``ct state
    established,related accept; iif "wan" drop``). TCP and ICMP are
    masqueraded.
``"symmetric"``  ``masquerade random``: a new random public port for every
    destination; the same filtering.
``"open"``  no NAT, no filter: the home's LAN is routed (a baseline for
    direct paths).

The same homes can hang off a plain :class:`~tests.e2e.netns.Network` (the
demo's bridge): :func:`add_home` plugs a router's wan into its switch.

Not modelled: hairpinning (two hosts of one home through the public
address), port-range exhaustion, more than 8 hosts per home.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from tests.e2e.netns import Host, HostCommandError, Network, _ip

__all__ = ["INTERNET", "PUBLIC_ADDRESS", "Home", "NatKind", "NatLab", "Router", "add_home"]

NatKind = Literal["eim", "symmetric", "open"]
INTERNET = ipaddress.ip_network("203.0.113.0/24")
PUBLIC_ADDRESS = "203.0.113.10"
MAX_HOMES = 50
MAX_HOSTS_PER_HOME = 8
_REPO = Path(__file__).resolve().parents[2]
_FLUSH_CONNTRACK = (
    "from meshd.kernel.conntrack import ConntrackFlusher\n"
    "f = ConntrackFlusher(); f(0, 0); f.close()\n"  # mark & 0 == 0: every entry, IPv4 and IPv6
)


def eim_mask(epoch: int, host: int) -> int:
    """What the EIM router XORs into LAN host ``host``'s UDP source port during boot ``epoch``.

    Never 0 (so no public port equals its LAN port: a client that assumes
    port preservation is caught) and below 0x8000 (so an ephemeral port,
    >= 32768, stays one: never 0, never privileged).
    """
    return (((epoch % 63) + 1) << 9) | (host << 6)


def _eim_ruleset(wan: str, hosts: Sequence[tuple[int, str]], epoch: int) -> str:
    per_host = []
    for index, address in hosts:
        mask = eim_mask(epoch, index)
        per_host.append(f'        oif "wan" ip saddr {address} '
                        f"update @eim {{ udp sport ^ {mask} : ip saddr . udp sport }}")
    snat = [f'        oif "wan" ip saddr {address} meta l4proto udp snat ip to {wan} : udp sport ^ {eim_mask(epoch, index)}'
            for index, address in hosts]
    return "\n".join([
        "    map eim {",
        "        type inet_service : ipv4_addr . inet_service",
        "        flags dynamic, timeout",
        "        timeout 300s",
        "    }",
        "    chain prerouting {",
        "        type nat hook prerouting priority dstnat; policy accept;",
        '        iif "wan" udp dport @eim dnat ip to udp dport map @eim',
        "    }",
        "    chain mapping {",
        "        type filter hook postrouting priority srcnat - 1; policy accept;",
        *per_host,
        "    }",
        "    chain postrouting {",
        "        type nat hook postrouting priority srcnat; policy accept;",
        *snat,
        '        oif "wan" masquerade',
        "    }",
        *_filter_chains(),
    ])


def _symmetric_ruleset() -> str:
    return "\n".join([
        "    chain prerouting {",  # must exist (even empty) for reverse NAT of replies
        "        type nat hook prerouting priority dstnat; policy accept;",
        "    }",
        "    chain postrouting {",
        "        type nat hook postrouting priority srcnat; policy accept;",
        '        oif "wan" masquerade random',
        "    }",
        *_filter_chains(),
    ])


def _filter_chains() -> list[str]:
    return [
        "    chain forward {",
        "        type filter hook forward priority filter; policy accept;",
        "        ct state established,related accept",
        '        iif "wan" drop',
        "    }",
        # Dropped in input, an unsolicited packet to the router is never confirmed in conntrack, so it cannot
        # clash with (and shift) a mapping the LAN asks for a moment later.
        "    chain input {",
        "        type filter hook input priority filter; policy accept;",
        "        ct state established,related accept",
        '        iif "wan" meta l4proto icmp accept',
        '        iif "wan" drop',
        "    }",
    ]


@dataclass
class Router:
    """A home's NAT router: ``wan`` on the internet, ``lan`` (a bridge) for the home's hosts."""

    host: Host
    wan: str
    lan: ipaddress.IPv4Network
    nat: NatKind = "eim"
    epoch: int = 0
    """Boot count: an EIM router's public ports depend on it, so a reboot gives new ones."""
    lan_hosts: list[tuple[int, str]] = field(default_factory=list)

    @property
    def gateway(self) -> str:
        return str(self.lan.network_address + 1)

    def run(self, argv: Sequence[str], **kwargs: Any) -> Any:
        return self.host.run(argv, **kwargs)

    def ruleset(self) -> str:
        """The ``nft -f`` text that installs the current behaviour (replacing the old table atomically)."""
        head = "table ip natlab {}\ndelete table ip natlab\n"
        if self.nat == "open":
            return head
        body = _eim_ruleset(self.wan, self.lan_hosts, self.epoch) if self.nat == "eim" else _symmetric_ruleset()
        return f"{head}table ip natlab {{\n{body}\n}}\n"

    def set_nat(self, kind: NatKind) -> None:
        """Switch the NAT behaviour now; the router's conntrack is flushed so no flow keeps the old one."""
        if kind not in get_args(NatKind):
            raise ValueError(f"unknown NAT kind {kind!r}; one of {', '.join(get_args(NatKind))}")
        self.nat = kind
        self._install()

    def reboot(self) -> None:
        """What a home router's reboot does to its NAT: every mapping forgotten, new public ports after it."""
        self.epoch += 1
        self._install()

    def flush_conntrack(self) -> None:
        self.host.run([sys.executable, "-c", _FLUSH_CONNTRACK], env={**os.environ, "PYTHONPATH": str(_REPO)})

    def _install(self) -> None:
        self.host.run(["nft", "-f", "-"], input=self.ruleset())
        self.flush_conntrack()

    def mappings(self) -> str:
        """The EIM map as nft prints it (for a failing test's message)."""
        return str(self.host.run(["nft", "list", "map", "ip", "natlab", "eim"], check=False).stdout)


@dataclass
class Home:
    index: int
    router: Router
    hosts: list[Host]

    @property
    def lan(self) -> ipaddress.IPv4Network:
        return self.router.lan


class NatLab(Network):
    """An internet with a public host and ``homes`` behind NAT routers. A context manager, like :class:`Network`.

    ``nat`` is one kind for every home or one per home. ``lab.public``,
    ``lab.homes[i].router``, ``lab.homes[i].hosts[j]``; ``lab.hosts`` lists
    every host (public first) so the network's cleanup covers their
    WireGuard sockets.
    """

    def __init__(self, homes: int = 2, *, hosts_per_home: int = 1,
                 nat: NatKind | Sequence[NatKind] = "eim") -> None:
        if not 1 <= homes <= MAX_HOMES:
            raise ValueError(f"1 to {MAX_HOMES} homes")
        if not 1 <= hosts_per_home <= MAX_HOSTS_PER_HOME:
            raise ValueError(f"1 to {MAX_HOSTS_PER_HOME} hosts per home")
        kinds = [nat] * homes if isinstance(nat, str) else list(nat)
        if len(kinds) != homes or any(k not in get_args(NatKind) for k in kinds):
            raise ValueError(f"nat: one of {get_args(NatKind)}, or one per home")
        super().__init__(1, ipv6=False)
        self.internet = f"{self.prefix}-inet"
        numbers = iter(range(1, 1 + 1 + homes * (hosts_per_home + 1)))

        def host(name: str, address: str) -> Host:
            return self._host(name, next(numbers), address)

        self.hosts = []
        self.public = host("pub", PUBLIC_ADDRESS)
        self.hosts.append(self.public)
        self.homes: list[Home] = []
        for n in range(1, homes + 1):
            lan = ipaddress.IPv4Network(f"10.{n}.0.0/24")
            wan = str(INTERNET.network_address + 100 + n)
            router = Router(host(f"r{n}", wan), wan, lan, kinds[n - 1])
            members = []
            for j in range(1, hosts_per_home + 1):
                member = host(f"r{n}h{j}", str(lan.network_address + 10 + j))
                self.hosts.append(member)
                members.append(member)
                router.lan_hosts.append((j - 1, member.underlay4))
            self.homes.append(Home(n, router, members))

    @property
    def routers(self) -> list[Router]:
        return [home.router for home in self.homes]

    def build(self) -> None:
        self._add_netns(self.internet)
        _ip("-n", self.internet, "link", "add", "br0", "type", "bridge", "forward_delay", "0", "mcast_snooping", "0")
        _ip("-n", self.internet, "link", "set", "br0", "up")
        port = 0

        def plug(netns: str, ifname: str, address: str) -> None:
            nonlocal port
            port += 1
            _ip("-n", self.internet, "link", "add", f"p{port}", "type", "veth", "peer", "name", ifname, "netns", netns)
            _ip("-n", self.internet, "link", "set", f"p{port}", "master", "br0", "up")
            _ip("-n", netns, "addr", "add", f"{address}/{INTERNET.prefixlen}", "dev", ifname)
            _ip("-n", netns, "link", "set", ifname, "up")

        self._add_netns(self.public.netns)
        plug(self.public.netns, "eth0", self.public.underlay4)
        for home in self.homes:
            self._add_netns(home.router.host.netns)
            plug(home.router.host.netns, "wan", home.router.wan)
            for member in home.hosts:
                self._add_netns(member.netns)
            _wire_lan(home)
        for home in self.homes:  # every LAN routed through its router (used only when that router is "open")
            for other in [self.public.netns, *(h.router.host.netns for h in self.homes if h is not home)]:
                _ip("-n", other, "route", "add", str(home.lan), "via", home.router.wan)
        for router in self.routers:
            _install_first(router)


def _wire_lan(home: Home) -> None:
    """Inside the namespaces of a home (made, the router's wan up): the router's ``lan`` bridge with the gateway
    address, forwarding on, a veth ``h<k>`` to each host's ``eth0`` with its address and a default route."""
    router = home.router
    _ip("-n", router.host.netns, "link", "add", "lan", "type", "bridge", "forward_delay", "0")
    _ip("-n", router.host.netns, "addr", "add", f"{router.gateway}/{router.lan.prefixlen}", "dev", "lan")
    _ip("-n", router.host.netns, "link", "set", "lan", "up")
    router.host.run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
    for k, member in enumerate(home.hosts, 1):
        _ip("-n", router.host.netns, "link", "add", f"h{k}", "type", "veth", "peer", "name", "eth0",
            "netns", member.netns)
        _ip("-n", router.host.netns, "link", "set", f"h{k}", "master", "lan", "up")
        _ip("-n", member.netns, "addr", "add", f"{member.underlay4}/{router.lan.prefixlen}", "dev", "eth0")
        _ip("-n", member.netns, "link", "set", "eth0", "up")
        _ip("-n", member.netns, "route", "add", "default", "via", router.gateway)


def _install_first(router: Router) -> None:
    """The router's first ruleset (a fresh router has no conntrack to flush)."""
    try:
        router.host.run(["nft", "-f", "-"], input=router.ruleset())
    except HostCommandError as exc:
        raise HostCommandError(f"{router.host.name}: cannot install NAT {router.nat!r}: {exc}") from exc


def add_home(net: Network, name: str, wan: str, lan: str, nat: NatKind = "symmetric", *, hosts: int = 1) -> Home:
    """A home behind a NAT router on a plain :class:`~tests.e2e.netns.Network` (after its ``build``), built now.

    The router is host ``name`` of ``net``, its ``wan`` (``ADDRESS/LEN``, an address of the network's switch,
    e.g. ``198.51.100.101/24``) plugged into the switch; its LAN ``lan`` (e.g. ``192.0.2.0/25``, gateway the
    first address) holds ``hosts`` hosts ``<name>h1``... at the LAN's ``.11``, ``.12``..., with a default
    route through the router; ``nat`` is its behaviour, as in a :class:`NatLab`. Nothing routes to the LAN
    from outside: only what the NAT lets back in arrives. :meth:`Network.close` removes it all.
    """
    if nat not in get_args(NatKind):
        raise ValueError(f"unknown NAT kind {nat!r}; one of {', '.join(get_args(NatKind))}")
    if not 1 <= hosts <= MAX_HOSTS_PER_HOME:
        raise ValueError(f"1 to {MAX_HOSTS_PER_HOME} hosts per home")
    address = wan.split("/")[0]
    network = ipaddress.IPv4Network(lan)
    router = Router(net.add_host(name, address), address, network, nat)
    net.plug(router.host, "wan", [wan])
    members = [net.add_host(f"{name}h{j}", str(network.network_address + 10 + j)) for j in range(1, hosts + 1)]
    router.lan_hosts = [(j, member.underlay4) for j, member in enumerate(members)]
    home = Home(router.host.index, router, members)  # numbered like the router's host
    _wire_lan(home)
    _install_first(router)
    return home
