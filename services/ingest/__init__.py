"""The ingest service: attachments, object storage and the queue."""
