"""The HTTP routes: callback channels, the send API, the operations endpoints."""
