"""``python -m mesh.cli``: the ``mesh`` command without the installed script."""

from mesh.cli import main

main()
