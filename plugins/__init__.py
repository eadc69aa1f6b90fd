"""Optimizer plugins shipped with zoedge, installed as the package ``zoedge_plugins``."""
