"""Deployment files shipped with the package: the Mosquitto config and ACL (deploy/mosquitto/)."""
