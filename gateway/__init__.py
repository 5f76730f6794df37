"""The running service: MQTT ingestion, the store, configuration and the CLI."""
