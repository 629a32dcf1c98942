"""Deleting conntrack entries by mark (ctnetlink), so a dead agent's flows cannot be revived."""

from __future__ import annotations

import errno
import os
import socket
import struct

__all__ = ["ConntrackFlusher"]

_NETLINK_NETFILTER = 12
_CT_DELETE = (1 << 8) | 2  # NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE
_CTA_MARK, _CTA_MARK_MASK = 8, 21
_NLM_F_REQUEST, _NLM_F_ACK, _NLMSG_ERROR = 1, 4, 2


class ConntrackFlusher:
    """Deletes conntrack entries by mark through one ctnetlink socket kept open (closing one costs ~10 ms).

    ``flusher(mark, mask)`` deletes every entry, IPv4 and IPv6, whose
    ``ct mark & mask == mark``: a ctnetlink DELETE without a tuple is a flush,
    filtered by mark in the kernel (what ``conntrack -D --mark mark/mask`` sends).
    """

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
        self._sock.settimeout(5)
        self._seq = 0

    def __call__(self, mark: int, mask: int) -> None:
        self._seq += 1
        attrs = (struct.pack("=HH", 8, _CTA_MARK) + struct.pack("!I", mark)
                 + struct.pack("=HH", 8, _CTA_MARK_MASK) + struct.pack("!I", mask))
        body = struct.pack("=BBH", socket.AF_UNSPEC, 0, 0) + attrs  # nfgenmsg: family, version, res_id
        header = struct.pack("=IHHII", 16 + len(body), _CT_DELETE, _NLM_F_REQUEST | _NLM_F_ACK, self._seq, 0)
        self._sock.send(header + body)
        while True:
            reply = self._sock.recv(65536)
            _, kind, _, seq = struct.unpack_from("=IHHI", reply)
            if kind == _NLMSG_ERROR and seq == self._seq:
                break
        (error,) = struct.unpack_from("=i", reply, 16)
        if error < 0 and -error != errno.ENOENT:
            raise OSError(-error, f"conntrack flush by mark {mark:#010x}: {os.strerror(-error)}")

    def close(self) -> None:
        self._sock.close()
