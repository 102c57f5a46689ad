"""maskprop service package."""
