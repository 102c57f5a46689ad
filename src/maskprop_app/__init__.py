"""The maskprop application: the ``maskprop`` command line, the embedded runner, the demo and
the plots.  The top layer: it may import the library, the plumbing and every service; nothing
imports it (apart from the ``python -m maskprop`` entry point)."""
