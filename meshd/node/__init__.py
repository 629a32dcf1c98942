"""The daemon itself: its state, its link to the controller, what it knows, and its lifetime.

:mod:`.state` is the state directory; :mod:`.enroll` joins a mesh;
:mod:`.session` keeps the netmap stream (moving between controller replicas)
and renews the certificate;
:mod:`.view` is what the node knows (netmap, policy, verified agents) and
caches; :mod:`.converger` applies changes; :mod:`.localapi` serves
``meshctl`` on a Unix socket and :mod:`.answers` says what it answers;
:mod:`.daemon` wires it all together. May import every other meshd package.
"""
