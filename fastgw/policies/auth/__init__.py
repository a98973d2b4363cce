"""key-auth: consumers identified by API key (policy.py), the compiled per-request lookup (lookup.pyx)."""
