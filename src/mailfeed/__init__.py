"""mailfeed: deliver a whole domain's mail over POP3 with its SMTP envelope."""

__version__ = "0.1.0"
