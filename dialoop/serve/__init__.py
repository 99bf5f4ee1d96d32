"""dialoop.serve."""
