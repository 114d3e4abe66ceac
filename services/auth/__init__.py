"""The auth service: who is calling, and may they."""
