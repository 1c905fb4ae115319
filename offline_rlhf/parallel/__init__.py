"""Distributed init, parallel dimensions and meshes, and parallelize()."""
