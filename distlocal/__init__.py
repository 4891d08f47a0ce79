"""distlocal."""
