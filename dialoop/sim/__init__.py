"""dialoop.sim."""
