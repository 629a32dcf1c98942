"""The idmesh distribution: shared command-line plumbing and ``meshctl``."""
