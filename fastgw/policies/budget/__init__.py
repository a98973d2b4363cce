"""budget: spend limits per consumer, group or model (policy.py) priced from a price table (prices.py)."""
