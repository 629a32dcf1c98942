"""The idmesh demo: a whole mesh on this one machine (``make demo``)."""
