"""``python -m maskprop`` is the ``maskprop`` command."""

from maskprop.cli import main

main()
