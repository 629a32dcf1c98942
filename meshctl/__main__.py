"""``python -m meshctl``: the ``meshctl`` command."""

from .main import main

main()
