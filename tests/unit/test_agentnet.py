"""Agent networking without root: the nft text it renders, and the driver's bookkeeping against fakes.

The rendered text is also fed to ``nft -c`` (userspace evaluation, no
commit) when nft is there; in CI (``CI=true``) that check may not skip. The
kernel's own verdict on it (e.g. hooks that refuse an expression) is only
given by the e2e tests, which load it for real in a namespace.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

import pytest

from meshcore.errors import Conflict, InvalidInput, NotFound, Unavailable
from meshd.agents.cgroups import Cgroup2, check_agent_name, locate_cgroup2
from meshd.agents.net import AgentNet
from meshd.agents.table import TABLE, AgentSlot, AgentTable, MarkField, render_add, render_remove, render_table
from meshd.kernel.nft import Libnftables
from tests.prerequisites import require

T = AgentTable("h1", "idmesh0", IPv4Network("100.64.0.0/26"), IPv6Network("fd00:1::/64"))
A1 = AgentSlot("a1", Path("/sys/fs/cgroup/idmesh-h1/agent-2"), 0x00200000, 2, "100.64.0.2", "fd00:1::2",
               "idmesh-h1/agent-2")
A3 = AgentSlot("a3", Path("/sys/fs/cgroup/idmesh-h1/agent-3"), 0x00300000, 3, "100.64.0.3", "fd00:1::3",
               "idmesh-h1/agent-3")

TABLE_TEXT = """\
add table inet idmesh_agents
delete table inet idmesh_agents
table inet idmesh_agents {
  comment "idmesh agents of node h1: mark field 0xfff00000, cgroup level 2"
  counter spoofed { }
  counter refused { }
  set agent_pool4 { type ipv4_addr; flags interval; elements = { 100.64.0.0, 100.64.0.2-100.64.0.63 }; }
  set agent_pool6 { type ipv6_addr; flags interval; elements = { fd00:1::, fd00:1::2-fd00:1::ffff:ffff:ffff:ffff }; }
  set mesh_ifaces { type ifname; elements = { "idmesh0" }; }
  map agent_cgroups { typeof socket cgroupv2 level 2 : verdict; }
  map agent_flows { typeof ct mark : verdict; }
  map agent_src4 { typeof meta mark : ip saddr; }
  map agent_src6 { typeof meta mark : ip6 saddr; }
  set agent_owner4 { typeof ip saddr . meta mark; }
  set agent_owner6 { typeof ip6 saddr . meta mark; }
  map agent_in4 { type ipv4_addr : verdict; }
  map agent_in6 { type ipv6_addr : verdict; }
  set mcp_ports4 { type ipv4_addr . inet_service; }
  set mcp_ports6 { type ipv6_addr . inet_service; }
  chain classify {
    type route hook output priority mangle; policy accept;
    meta mark set meta mark & 0x000fffff
    socket cgroupv2 level 2 vmap @agent_cgroups
    ct mark & 0xfff00000 vmap @agent_flows
  }
  chain translate {
    type nat hook postrouting priority srcnat; policy accept;
    oifname @mesh_ifaces snat ip to meta mark & 0xfff00000 map @agent_src4
    oifname @mesh_ifaces snat ip6 to meta mark & 0xfff00000 map @agent_src6
  }
  chain antispoof {
    type filter hook postrouting priority srcnat + 10; policy accept;
    oifname != @mesh_ifaces accept
    ip saddr . meta mark & 0xfff00000 @agent_owner4 accept
    ip6 saddr . meta mark & 0xfff00000 @agent_owner6 accept
    ip saddr @agent_pool4 counter name spoofed drop
    ip6 saddr @agent_pool6 counter name spoofed drop
  }
  chain watch {
    type filter hook output priority mangle + 10; policy accept;
    meta mark & 0xfff00000 != 0 accept
    ct state new ip daddr . tcp dport @mcp_ports4 limit rate 20/second burst 40 packets log group 7301 prefix "mcp"
    ct state new ip6 daddr . tcp dport @mcp_ports6 limit rate 20/second burst 40 packets log group 7301 prefix "mcp"
  }
  chain inbound {
    type filter hook input priority filter; policy accept;
    ct state established,related accept
    ip daddr vmap @agent_in4
    ip6 daddr vmap @agent_in6
    ip daddr @agent_pool4 counter name refused drop
    ip6 daddr @agent_pool6 counter name refused drop
  }
}
"""

ADD_TEXT = """\
add chain inet idmesh_agents agent_2
flush chain inet idmesh_agents agent_2
add rule inet idmesh_agents agent_2 meta mark set meta mark & 0x000fffff | 0x00200000
add rule inet idmesh_agents agent_2 ct mark set ct mark & 0x000fffff | 0x00200000
add chain inet idmesh_agents agent_2_in
flush chain inet idmesh_agents agent_2_in
add rule inet idmesh_agents agent_2_in socket cgroupv2 level 2 "idmesh-h1/agent-2" ct mark set ct mark & 0x000fffff | 0x00200000 accept
add rule inet idmesh_agents agent_2_in counter name refused drop
add element inet idmesh_agents agent_cgroups { "idmesh-h1/agent-2" comment "a1" : goto agent_2 }
add element inet idmesh_agents agent_flows { 0x00200000 comment "a1" : goto agent_2 }
add element inet idmesh_agents agent_src4 { 0x00200000 : 100.64.0.2 }
add element inet idmesh_agents agent_src6 { 0x00200000 : fd00:1::2 }
add element inet idmesh_agents agent_owner4 { 100.64.0.2 . 0x00200000 }
add element inet idmesh_agents agent_owner6 { fd00:1::2 . 0x00200000 }
add element inet idmesh_agents agent_in4 { 100.64.0.2 comment "a1" : goto agent_2_in }
add element inet idmesh_agents agent_in6 { fd00:1::2 comment "a1" : goto agent_2_in }
"""

REMOVE_TAIL = """\
delete element inet idmesh_agents agent_flows { 0x00200000 }
delete element inet idmesh_agents agent_src4 { 0x00200000 }
delete element inet idmesh_agents agent_src6 { 0x00200000 }
delete element inet idmesh_agents agent_owner4 { 100.64.0.2 . 0x00200000 }
delete element inet idmesh_agents agent_owner6 { fd00:1::2 . 0x00200000 }
delete element inet idmesh_agents agent_in4 { 100.64.0.2 }
delete element inet idmesh_agents agent_in6 { fd00:1::2 }
delete chain inet idmesh_agents agent_2
delete chain inet idmesh_agents agent_2_in
"""


# -- the mark field ---------------------------------------------------------------------------------------------
def test_the_default_mark_field_is_bits_20_to_31() -> None:
    f = MarkField()
    assert (f.mask, f.shift, f.capacity, f.keep) == (0xFFF00000, 20, 4095, 0x000FFFFF)
    assert f.value(2) == 0x00200000 and f.value(4095) == 0xFFF00000


@pytest.mark.parametrize("mask", [0, 0x00FF00F0, 0x1_0000_0000, -1])
def test_a_mark_mask_must_be_one_run_of_32_bits(mask: int) -> None:
    with pytest.raises(InvalidInput, match="mark mask"):
        MarkField(mask)


def test_a_narrow_field_still_works_and_refuses_what_does_not_fit() -> None:
    f = MarkField(0x00FF0000)
    assert (f.shift, f.capacity, f.keep) == (16, 255, 0xFF00FFFF)
    with pytest.raises(InvalidInput, match="does not fit"):
        f.value(256)
    with pytest.raises(InvalidInput):
        f.value(0)  # 0 means "no agent"


# -- rendering --------------------------------------------------------------------------------------------------
def test_the_table() -> None:
    assert render_table(T) == TABLE_TEXT


def test_the_table_follows_interface_mask_level_and_block() -> None:
    t = AgentTable("n2", "wg7", IPv4Network("100.64.0.64/30"), IPv6Network("fd00:1:0:1::/120"),
                   MarkField(0x00FF0000), level=4)
    text = render_table(t)
    assert "elements = { 100.64.0.64, 100.64.0.66-100.64.0.67 }" in text
    assert "elements = { fd00:1:0:1::, fd00:1:0:1::2-fd00:1:0:1::ff }" in text
    assert 'set mesh_ifaces { type ifname; elements = { "wg7" }; }' in text and "idmesh0" not in text
    assert "socket cgroupv2 level 4 vmap @agent_cgroups" in text
    assert "meta mark set meta mark & 0xff00ffff" in text and "meta mark & 0x00ff0000 map @agent_src4" in text


def test_adding_an_agent_is_its_chain_and_elements_only() -> None:
    text = render_add(T, A1)
    assert text == ADD_TEXT
    assert not any(line.startswith(("delete", "flush table", "table")) for line in text.splitlines())


def test_removing_an_agent_names_only_its_own_entries() -> None:
    assert render_remove(T, A1, others=[A1, A3]) == \
        'delete element inet idmesh_agents agent_cgroups { "idmesh-h1/agent-2" }\n' + REMOVE_TAIL


def test_removing_an_agent_whose_cgroup_vanished_rebuilds_the_cgroup_map_in_the_same_transaction() -> None:
    assert render_remove(T, A1, cgroup_gone=True, others=[A3, A1]) == (
        "flush map inet idmesh_agents agent_cgroups\n"
        'add element inet idmesh_agents agent_cgroups { "idmesh-h1/agent-3" comment "a3" : goto agent_3 }\n'
        + REMOVE_TAIL)
    assert render_remove(T, A1, cgroup_gone=True, others=[A1]) == \
        "flush map inet idmesh_agents agent_cgroups\n" + REMOVE_TAIL


def test_a_slot_command_enters_the_cgroup_before_it_runs() -> None:
    argv = A1.command(["python3", "agent.py", "--flag"])
    assert argv[:3] == ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"']
    assert argv[3:] == ["/sys/fs/cgroup/idmesh-h1/agent-2/cgroup.procs", "python3", "agent.py", "--flag"]


def test_agent_names() -> None:
    assert check_agent_name("agent-7f3a.b_c") == "agent-7f3a.b_c"
    for bad in ("", ".", "..", "a/b", 'x"y', "cgroup.procs", "a" * 129, "a b"):
        with pytest.raises(InvalidInput, match="cgroup name"):
            check_agent_name(bad)


def test_locating_cgroup2(tmp_path: Path) -> None:
    with pytest.raises(Unavailable, match="no cgroup2 hierarchy"):
        locate_cgroup2(tmp_path / "missing", "idmesh-h1", mount=False)
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "cpu").mkdir()
    with pytest.raises(Unavailable, match="no cgroup2 hierarchy"):
        locate_cgroup2(tmp_path / "v1", "idmesh-h1", mount=False)
    (tmp_path / "v1" / "unified").mkdir()
    (tmp_path / "v1" / "unified" / "cgroup.controllers").write_text("")
    with pytest.raises(Unavailable, match="not below /sys/fs/cgroup"):  # nft could not resolve it there
        locate_cgroup2(tmp_path / "v1", "idmesh-h1", mount=False)


# -- the driver, against fakes ----------------------------------------------------------------------------------
class FakeCgroups:
    """In-memory cgroupfs; every call lands in ``log`` (shared with the fake nft) so order can be checked."""

    def __init__(self, log: list[str], where: Cgroup2) -> None:
        self.log, self.where = log, where
        self.groups: dict[str, set[int]] = {}
        self.fail_kill = False

    def prepare(self) -> Cgroup2:
        self.log.append("prepare")
        return self.where

    def create(self, agent_id: str) -> Path:
        self.log.append(f"create {agent_id}")
        if agent_id in self.groups:
            raise Conflict("exists")
        self.groups[agent_id] = set()
        return self.where.directory / agent_id

    def move(self, agent_id: str, pid: int) -> None:
        self.log.append(f"move {pid} {agent_id}")
        self.groups[agent_id].add(pid)

    def path(self, name: str) -> Path:
        return self.where.directory / name

    def move_home(self, pid: int, home: str) -> None:
        self.log.append(f"move {pid} home {home}")
        for members in self.groups.values():
            members.discard(pid)

    def populated(self, agent_id: str) -> bool:
        return bool(self.groups[agent_id])

    def kill(self, agent_id: str | None) -> None:
        self.log.append(f"kill {agent_id}")
        if self.fail_kill:
            raise Unavailable(f"cgroup {agent_id}: processes still running")
        for name in ([agent_id] if agent_id else list(self.groups)):
            self.groups.get(name, set()).clear()  # like the real one: a missing cgroup has nothing to kill

    def remove(self, agent_id: str) -> None:
        self.log.append(f"rmdir {agent_id}")
        self.groups.pop(agent_id, None)

    def exists(self, agent_id: str) -> bool:
        return agent_id in self.groups

    def close(self) -> None:
        self.log.append("rmdir all")
        self.groups.clear()


class FakeNft:
    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.scripts: list[str] = []
        self.refuse: str | None = None

    def __call__(self, script: str) -> str:
        first = script.splitlines()[0]
        if self.refuse and self.refuse in script:
            raise Unavailable("Could not process rule: No such file or directory")
        self.log.append(f"nft {first}")
        self.scripts.append(script)
        return "table inet idmesh_agents {\n\tcounter spoofed {\n\t\tpackets 7 bytes 420\n\t}\n}\n"


@pytest.fixture
def log() -> list[str]:
    return []


@dataclass
class Rig:
    net: AgentNet
    cg: FakeCgroups
    nft: FakeNft
    forgotten: list[tuple[int, int]]


@pytest.fixture
def rig(log: list[str]) -> Rig:
    """An AgentNet for node h1 on a hybrid host (cgroup2 at /sys/fs/cgroup/unified), on fakes."""
    cg = FakeCgroups(log, Cgroup2(Path("/sys/fs/cgroup/unified/idmesh-h1"), "unified/idmesh-h1", 2, "/idmesh-h1"))
    nft = FakeNft(log)
    forgotten: list[tuple[int, int]] = []

    def conntrack(mark: int, mask: int) -> None:
        log.append(f"forget {mark:#x}")
        forgotten.append((mark, mask))

    net = AgentNet("h1", "idmesh0", "100.64.0.0/26", "fd00:1::/64", nft=nft, cgroups=cg, conntrack=conntrack,
                   local_routes=lambda blocks, present: log.append(f"local {' '.join(blocks)} {present}"))
    return Rig(net, cg, nft, forgotten)


def test_start_installs_the_table_with_the_level_cgroupfs_reports(rig: Rig
                                                                  ) -> None:
    net, cg, nft = rig.net, rig.cg, rig.nft
    cg.where = Cgroup2(Path("/sys/fs/cgroup/system.slice/meshd.service/idmesh-h1"),
                       "system.slice/meshd.service/idmesh-h1", 4)
    net.start()
    net.start()  # idempotent
    assert len(nft.scripts) == 1 and "socket cgroupv2 level 4 vmap" in nft.scripts[0]
    slot = net.add("a1", "100.64.0.2", "fd00:1::2")
    assert slot.nft_cgroup == "system.slice/meshd.service/idmesh-h1/agent-2"


def test_add_move_populated_remove(rig: Rig, log: list[str]) -> None:
    net, nft, forgotten = rig.net, rig.nft, rig.forgotten
    net.start()
    slot = net.add("a1", "100.64.0.2", "fd00:1::2")
    assert slot == AgentSlot("a1", Path("/sys/fs/cgroup/unified/idmesh-h1/agent-2"), 0x00200000, 2, "100.64.0.2",
                             "fd00:1::2", "unified/idmesh-h1/agent-2")
    assert nft.scripts[-1] == ADD_TEXT.replace('"idmesh-h1/agent-2"', '"unified/idmesh-h1/agent-2"')
    assert net.slots == {"a1": slot}
    assert not net.populated("a1")
    net.move(4242, "a1")
    assert net.populated("a1")
    for bad in (0, -1, True):  # writing 0 to cgroup.procs would move meshd itself
        with pytest.raises(InvalidInput, match="not a process id"):
            net.move(bad, "a1")
    with pytest.raises(NotFound, match="agent a9 does not run on node h1"):
        net.move(4242, "a9")
    log.clear()
    net.remove("a1")
    # processes die while their mark still applies; their flows are forgotten before and after the entries go
    # (late kernel packets of those flows leave as the node, not as spoofs); the directory goes last
    assert log == ["kill agent-2", "forget 0x200000",
                   'nft delete element inet idmesh_agents agent_cgroups { "unified/idmesh-h1/agent-2" }',
                   "forget 0x200000", "rmdir agent-2"]
    assert forgotten == [(0x00200000, 0xFFF00000)] * 2
    assert net.slots == {}
    with pytest.raises(NotFound, match="agent a1 does not run on node h1"):
        net.populated("a1")


def test_the_peers_mcp_ports_replace_the_watched_sets_in_one_transaction(rig: Rig) -> None:
    rig.net.start()
    rig.net.set_mcp_ports([("100.64.0.65", 8080), ("100.64.0.65", 8080), ("100.64.0.1", 9000)],
                          [("fd00:1::1", 8080)])
    assert rig.nft.scripts[-1] == (
        f"flush set inet {TABLE} mcp_ports4\nflush set inet {TABLE} mcp_ports6\n"
        f"add element inet {TABLE} mcp_ports4 {{ 100.64.0.1 . 9000, 100.64.0.65 . 8080 }}\n"
        f"add element inet {TABLE} mcp_ports6 {{ fd00:1::1 . 8080 }}\n")
    rig.net.set_mcp_ports([], [])
    assert rig.nft.scripts[-1] == f"flush set inet {TABLE} mcp_ports4\nflush set inet {TABLE} mcp_ports6\n"


def test_refusals_name_the_agent(rig: Rig) -> None:
    net = rig.net
    with pytest.raises(Unavailable, match="not started"):
        net.add("a1", "100.64.0.2", "fd00:1::2")
    net.start()
    net.add("a1", "100.64.0.2", "fd00:1::2")
    cases = [
        (("a1", "100.64.0.3", "fd00:1::3"), Conflict, "agent a1 already runs on node h1"),
        (("a2", "100.64.0.2", "fd00:1::3"), Conflict, "agent a2: address 100.64.0.2 is agent a1's"),
        (("a2", "100.64.0.3", "fd00:1::2"), Conflict, "agent a2: address fd00:1::2 is agent a1's"),
        (("a2", "100.64.0.1", "fd00:1::3"), InvalidInput, "100.64.0.1 is not an agent address"),
        (("a2", "100.64.0.0", "fd00:1::3"), InvalidInput, "100.64.0.0 is not an agent address"),
        (("a2", "100.64.0.63", "fd00:1::3"), InvalidInput, "100.64.0.63 is not an agent address"),
        (("a2", "100.64.0.64", "fd00:1::3"), InvalidInput, "not an agent address of block 100.64.0.0/26"),
        (("a2", "100.64.0.3", "fd00:1::1"), InvalidInput, "fd00:1::1 is not an agent address"),
        (("a2", "100.64.0.3", "fd00:2::3"), InvalidInput, "fd00:2::3 is not an agent address"),
        (("a2", "fd00:1::3", "100.64.0.3"), InvalidInput, "agent a2"),
        (("../a2", "100.64.0.3", "fd00:1::3"), InvalidInput, "cgroup name"),
    ]
    for args, cls, message in cases:
        with pytest.raises(cls, match=message):
            net.add(*args)
    assert list(net.slots) == ["a1"]


def test_a_refused_add_leaves_no_cgroup(rig: Rig) -> None:
    net, cg, nft = rig.net, rig.cg, rig.nft
    net.start()
    nft.refuse = "agent_src4 { 0x00300000"
    with pytest.raises(Unavailable, match=r"nftables refused adding agent a3 \(100.64.0.3, fd00:1::3\)"):
        net.add("a3", "100.64.0.3", "fd00:1::3")
    assert cg.groups == {} and net.slots == {}


def test_remove_takes_the_identity_away_even_when_processes_will_not_die(
        rig: Rig) -> None:
    net, cg, nft = rig.net, rig.cg, rig.nft
    net.start()
    net.add("a1", "100.64.0.2", "fd00:1::2")
    cg.fail_kill = True
    with pytest.raises(Unavailable, match="processes still running"):
        net.remove("a1")
    assert nft.scripts[-1].endswith("delete chain inet idmesh_agents agent_2_in\n") and net.slots == {}


def test_remove_when_the_cgroup_vanished_rebuilds_the_map(rig: Rig) -> None:
    net, cg, nft = rig.net, rig.cg, rig.nft
    net.start()
    net.add("a1", "100.64.0.2", "fd00:1::2")
    net.add("a3", "100.64.0.3", "fd00:1::3")
    del cg.groups["agent-2"]  # an operator's rmdir
    net.remove("a1")
    assert nft.scripts[-1].startswith("flush map inet idmesh_agents agent_cgroups\n"
                                      'add element inet idmesh_agents agent_cgroups { "unified/idmesh-h1/agent-3"')


def test_close_kills_then_deletes_the_table_then_the_cgroups(rig: Rig,
                                                             log: list[str]) -> None:
    net, nft = rig.net, rig.nft
    net.start()
    net.add("a1", "100.64.0.2", "fd00:1::2")
    net.add("a3", "100.64.0.3", "fd00:1::3")
    assert net.spoofed() == 7
    log.clear()
    net.close()
    assert log == ["kill None", "forget 0x200000", "forget 0x300000", f"nft add table inet {TABLE}",
                   "local 100.64.0.0/26 fd00:1::/64 False", "forget 0x200000", "forget 0x300000", "rmdir all"]
    assert nft.scripts[-1] == f"add table inet {TABLE}\ndelete table inet {TABLE}\n"
    net.close()  # idempotent
    with pytest.raises(Unavailable, match="not started"):
        net.add("a1", "100.64.0.2", "fd00:1::2")


def test_a_failed_start_leaves_nothing(rig: Rig, log: list[str]) -> None:
    net, nft = rig.net, rig.nft
    nft.refuse = "table inet idmesh_agents {"
    with pytest.raises(Unavailable, match="nftables refused the agent table of node h1"):
        net.start()
    assert log == ["prepare", "kill None", f"nft add table inet {TABLE}", "local 100.64.0.0/26 fd00:1::/64 False",
                   "rmdir all"]


def test_construction_refuses_what_cannot_work() -> None:
    cases = [
        (("H1", "idmesh0", "100.64.0.0/26", "fd00:1::/64"), {}, "node name"),
        (("h1", 'idm"0', "100.64.0.0/26", "fd00:1::/64"), {}, "interface name"),
        (("h1", "idmesh0", "100.64.0.1/26", "fd00:1::/64"), {}, "agent pools"),
        (("h1", "idmesh0", "100.64.0.0/31", "fd00:1::/64"), {}, "no room for agents"),
        (("h1", "idmesh0", "100.64.0.0/18", "fd00:1::/64"), {}, "use a wider mask"),
        (("h1", "idmesh0", "100.64.0.0/23", "fd00:1::/64"), {"mark_mask": 0x00FF0000}, "use a wider mask"),
        (("h1", "idmesh0", "100.64.0.0/26", "fd00:1::/64"), {"cgroup_parent": "../escape"}, "cgroup name"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(InvalidInput, match=message):
            AgentNet(*args, **kwargs)  # type: ignore[arg-type]
    AgentNet("h1", "idmesh0", "100.64.0.0/18", "fd00:1::/64", mark_mask=0xFFFC0000)  # 16382 agents: 14 bits


# -- nft itself -------------------------------------------------------------------------------------------------
def _need_nft() -> None:
    missing = []
    if shutil.which("nft") is None or shutil.which("unshare") is None:
        missing.append("the nft and unshare commands (apt-get install nftables util-linux)")
    if os.geteuid() != 0:
        missing.append("root (nft -c reads the kernel's ruleset)")
    require("cannot check the nft text", missing)


CHECK = """
mount -t tmpfs none /sys/fs/cgroup && mkdir -p /sys/fs/cgroup/idmesh-h1/agent-2 /sys/fs/cgroup/idmesh-h1/agent-3 && exec nft -c -f -
"""


def test_nft_accepts_the_rendered_text() -> None:
    """``nft -c`` on table + two agents added + one removed (+ the rebuild form), with real cgroup paths.

    The cgroup directories nft resolves are made on a tmpfs in a private mount
    namespace, so nothing of the machine's cgroups is touched; ``-c`` commits nothing.
    """
    _need_nft()
    script = (render_table(T) + render_add(T, A1) + render_add(T, A3) + render_remove(T, A1, others=[A1, A3])
              + render_add(T, A1) + render_remove(T, A3, cgroup_gone=True, others=[A1, A3]))
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", CHECK], input=script,
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    broken = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", CHECK],
                            input=render_table(T).replace("vmap @agent_cgroups", "vmap @agent_nowhere"),
                            capture_output=True, text=True, timeout=30, check=False)
    assert broken.returncode != 0 and "agent_nowhere" in broken.stderr  # the check does check


def test_libnftables_dry_run_accepts_the_table_and_maps_errors() -> None:
    _need_nft()
    nft = Libnftables(check=True)
    try:
        nft(render_table(T))
        with pytest.raises(Unavailable, match="syntax error"):
            nft("table inet idmesh_agents { chain mark { } }\n")  # "mark" is a keyword, not a chain name
    finally:
        nft.close()
    listed = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, timeout=30, check=False).stdout
    assert TABLE not in listed  # a dry run commits nothing
    with pytest.raises(Unavailable, match="closed"):
        nft("list tables\n")



def test_a_process_is_an_agents_only_if_its_whole_cgroup_path_is_the_agents(rig: Rig) -> None:
    rig.net.start()
    rig.net.add("a1", "100.64.0.2", "fd00:1::2")
    assert rig.net.agent_of_cgroup("/idmesh-h1/agent-2") == "a1"
    assert rig.net.agent_of_cgroup("/idmesh-h1/agent-2/") == "a1"
    for elsewhere in ("/user.slice/a1", "/a1", "/idmesh-h2/a1", "/idmesh-h1/a1/nested", "/x/idmesh-h1/agent-2",
                      "/idmesh-h1/a2", "/idmesh-h1"):
        assert rig.net.agent_of_cgroup(elsewhere) is None, elsewhere


def test_the_cgroup_tree_names_the_node_directory_as_proc_pid_cgroup_does(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from meshd.agents import cgroups

    (tmp_path / "cgroup.controllers").write_text("")
    (tmp_path / "system.slice").mkdir()
    (tmp_path / "system.slice" / "cgroup.controllers").write_text("")
    monkeypatch.setattr(cgroups, "NFT_CGROUP_BASE", tmp_path)  # a hierarchy of our own, as meshd.service sees one
    where = locate_cgroup2(tmp_path / "system.slice", "idmesh-h1", mount=False)
    assert where.tree == "/system.slice/idmesh-h1" and where.agent_level == 3


def test_a_staged_caller_is_in_its_cgroup_before_the_certificate_and_keeps_it(rig: Rig, log: list[str]) -> None:
    net, cg = rig.net, rig.cg
    net.start()
    log.clear()
    net.stage("100.64.0.2", 4242)  # while the controller signs
    assert log == ["create agent-2", "move 4242 agent-2"]  # no nft yet: its packets are the node's
    slot = net.add("a1", "100.64.0.2", "fd00:1::2", staged=True)
    assert log[2:] == ["nft add chain inet idmesh_agents agent_2"]
    assert cg.groups == {"agent-2": {4242}} and slot.cgroup.name == "agent-2" and net.populated("a1")
    assert net.agent_of_cgroup("/idmesh-h1/agent-2") == "a1"
    with pytest.raises(InvalidInput, match="100.64.0.1 is not an agent address"):
        net.stage("100.64.0.1", 4243)  # the node's own


def test_a_failed_staged_birth_gives_the_caller_back_and_leaves_nothing(rig: Rig, log: list[str]) -> None:
    net, cg, nft = rig.net, rig.cg, rig.nft
    net.start()
    net.stage("100.64.0.2", 4242)
    nft.refuse = "agent_src4"
    with pytest.raises(Unavailable):
        net.add("a1", "100.64.0.2", "fd00:1::2", staged=True)
    assert cg.groups == {"agent-2": {4242}} and net.slots == {}  # the caller was not killed with the cgroup
    log.clear()
    net.unstage("100.64.0.2", 4242, "/user.slice/session-1.scope")
    assert log == ["move 4242 home /user.slice/session-1.scope", "rmdir agent-2"] and cg.groups == {}


def test_the_nodes_cgroup_directory_goes_below_meshds_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under systemd that is meshd.service's delegated subtree; a level deeper, agents are a level deeper too."""
    from meshd.agents import cgroups
    from meshd.agents.cgroups import check_cgroup_parent, own_cgroup

    proc = tmp_path / "cgroup"
    proc.write_text("1:name=systemd:/system.slice/meshd.service\n0::/system.slice/meshd.service\n")
    assert own_cgroup(proc) == "system.slice/meshd.service"
    proc.write_text("0::/\n")
    assert own_cgroup(proc) == ""
    root = tmp_path / "root"
    (root / "system.slice" / "meshd.service").mkdir(parents=True)
    (root / "cgroup.controllers").write_text("")
    monkeypatch.setattr(cgroups, "NFT_CGROUP_BASE", root)
    where = locate_cgroup2(root, "system.slice/meshd.service/idmesh-h1", mount=False)
    assert where.tree == "/system.slice/meshd.service/idmesh-h1" and where.agent_level == 4
    assert where.nft_prefix == "system.slice/meshd.service/idmesh-h1"
    assert check_cgroup_parent("user.slice/user@0.service/app.slice/idmesh-x") == \
        "user.slice/user@0.service/app.slice/idmesh-x"
    for bad in ("a/../b", "a//b", "/a", "cgroup.procs", 'x"y', "a b"):
        with pytest.raises(InvalidInput, match="cgroup name path"):
            check_cgroup_parent(bad)
