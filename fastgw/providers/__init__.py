"""Providers: one module per wire format behind one interface (base.py)."""
