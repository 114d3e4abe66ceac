"""Janna's services: five gRPC processes and the code they share."""
