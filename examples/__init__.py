"""Example backends that run behind the Session Gateway."""
