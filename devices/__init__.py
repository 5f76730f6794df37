"""The device side: metric catalog, units, topic grammar and payload interpretation."""
