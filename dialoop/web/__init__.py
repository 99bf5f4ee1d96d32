"""dialoop.web."""
