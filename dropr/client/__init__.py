"""The sending side: the spool producers write to and dropr-client."""
