"""meshd, the node daemon: enrollment, tunnels, policy enforcement, agents."""
