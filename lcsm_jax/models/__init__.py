"""Model families; each has an online adapter for the decoding engine."""
