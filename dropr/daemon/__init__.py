"""What both twistd plugins share: logs, TLS, signed requests."""
