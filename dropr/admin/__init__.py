"""The dropr command for operators."""
