"""The retrieval service: search over the caller's own documents."""
