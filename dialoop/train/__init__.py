"""dialoop.train."""
