"""The file-system storage, dropr's default."""
