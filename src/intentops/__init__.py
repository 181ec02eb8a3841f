"""intentops: a customer-support intent classifier through the whole ML lifecycle."""

__version__ = "0.1.0"
