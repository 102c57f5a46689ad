"""maskprop: the pure science of the human-in-the-loop mask labelling method.

Papadopoulos, Weber, Torralba, "Scaling up instance annotation via label propagation".
Nothing in this package imports Kafka, Redis, gRPC, FastAPI or torch: services adapt it.
"""

__version__ = "0.1.0"
