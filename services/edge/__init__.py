"""The edge: Envoy's configuration, generated from the protos and settings."""
