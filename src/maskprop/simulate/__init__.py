"""Simulation of the method at scale (paper Sec. 5.2): pools of (f, s, IoU) triplets,
simulated annotators and the baselines the paper compares against."""
