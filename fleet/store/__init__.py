"""The fleet manager's state."""
