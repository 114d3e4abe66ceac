"""Tests of the deployment files: docker-compose.yml, the Dockerfile, the runbook."""
