"""The receiving side: dropr-server."""
