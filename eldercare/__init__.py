"""eldercare-gateway: smart-eldercare IoT and telehealth integration gateway."""

__version__ = "0.1.0"
