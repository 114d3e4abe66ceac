"""The chat service: conversations and the streamed turn."""
