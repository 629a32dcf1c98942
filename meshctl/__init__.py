"""``meshctl``: the administrator's and the node user's command line.

One module per noun (:mod:`.tokens`, :mod:`.nodes`, :mod:`.routes`,
:mod:`.policy`, :mod:`.agent`, :mod:`.whois`, :mod:`.status`, :mod:`.audit`,
:mod:`.flows`, :mod:`.deploy`), each with a ``register(commands)`` that adds its
subcommands and points each at its handler with ``set_defaults(func=...)``;
:mod:`.main` builds the parser from them and calls the handler through
:func:`idmesh.cli.run`. Controller commands use the admin credential
(``--admin``, ``IDMESH_ADMIN``), node commands meshd's local socket
(``--socket``, ``IDMESH_SOCKET``), both opened by :mod:`.connect`;
:mod:`.output` formats tables and times. A module's top level imports only the
standard library, light plumbing (:mod:`idmesh.cli`, :mod:`idmesh.paths`) and
meshcore's stdlib-only ``errors`` and ``durations``, so building the parser
costs next to nothing; what a command needs (the policy compiler, the wire
models, the HTTP clients, :mod:`deploy`) its handler imports, so ``meshctl
agent run`` pays for none of what ``meshctl policy explain`` needs
(``tests/unit/test_meshctl.py`` holds it to that). meshctl may import
:mod:`meshcore`, :mod:`idmesh` and :mod:`deploy`; nothing imports meshctl.
"""

__all__: list[str] = []
