"""``meshctl deploy``: install meshd on hosts over SSH and join them to the mesh.

One run, for every host of an inventory (concurrently, a failing host never
stops the others)::

    connect (asyncssh)  ->  probe (what is installed, enrolled, running)
        ->  plan (pure: deploy.plan.plan_host)  ->  the planned steps only:
            install    upload the project wheel and its dependencies, pip-install
                       them into a virtual environment (install_dir) offline
            unit       write meshd.service (systemd hosts)
            enroll     a fresh single-use token per host, made with the admin
                       credential, then ``meshd enroll`` on the host
            start      systemctl, or ``meshd run`` detached with a pidfile
        ->  a result per host (ok / failed and why)

A second run changes nothing on a host that is current: same wheel
(content digest), enrolled in this mesh (node.json's CA fingerprint is the
admin credential's), meshd running. No token is made for such a host.

Modules: ``inventory`` (the YAML file, validated with file:line errors),
``plan`` (decisions, no I/O), ``progress`` (the per-host display),
``units`` (rendering meshd.service for a host), ``artifacts`` (wheels),
``remote`` (the stdlib helper run on each host), ``ssh`` (the asyncssh side),
``runner`` (orchestration), ``cli`` (``add_parser``/``run`` for meshctl).
It may import :mod:`meshcore` and the shared plumbing :mod:`idmesh`; the
``meshctl`` command imports it, never the other way round.
"""

__all__: list[str] = []
