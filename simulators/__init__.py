"""Simulated devices, residents and hotlines."""
