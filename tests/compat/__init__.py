"""Peers from other versions, for the tests of wire compatibility (:mod:`meshcore.wire`)."""
