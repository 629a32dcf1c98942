"""Every raw kernel interface meshd uses, each small and behind an object tests can replace.

libnftables in-process (:mod:`.nft`), rtnetlink through pyroute2
(:mod:`.netlink` for links and the one mapping of its errors,
:mod:`.netconf` for an interface's addresses and routes, with an
in-memory fake), NFLOG (:mod:`.nflog`) and ctnetlink (:mod:`.conntrack`).
What to ask of the kernel is decided elsewhere; here it is only said.
May import :mod:`meshcore` (errors, names) and nothing else of idmesh's.
"""
