"""``python -m maskprop_app`` is the ``maskprop`` command."""

from maskprop_app.cli import main

main()
