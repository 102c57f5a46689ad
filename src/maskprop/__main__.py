"""``python -m maskprop`` is the ``maskprop`` command: an entry point, never imported by the
library, so the one sanctioned import of the application from ``maskprop``."""

from maskprop_app.cli import main

main()
