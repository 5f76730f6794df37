"""Rules, alert lifecycle and routing (the rules engine lands in the next issue)."""
