"""The model gateway: every model call of the product."""
