"""Telemetry, status and events from the broker into the store: pure decode, the MQTT side, worker processes."""
