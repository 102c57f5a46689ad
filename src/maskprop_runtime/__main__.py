"""``python -m maskprop_runtime`` is the full ``maskprop`` command (services included)."""

from maskprop_runtime.cli import main

main()
