"""Pure translations between wire formats; no I/O."""
