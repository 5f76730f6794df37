"""MQTT ingestion worker."""
