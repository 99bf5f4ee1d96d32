"""dialoop.collect."""
