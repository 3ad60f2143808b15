"""The app factory that wires the bridge from its configuration, and the process model."""
