"""Dify's Service API: the client the pipeline asks."""
