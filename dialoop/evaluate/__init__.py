"""dialoop.evaluate."""
