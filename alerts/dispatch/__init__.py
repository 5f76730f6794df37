"""Dispatch: how an alert leaves the gateway (../shared/spec/hotline-dispatch.md).

Adapters (``webhook.py``, ``sia.py``) format and send one attempt and say what happened;
they hold no retry or escalation logic. The dispatcher decides retries, deadlines and
escalation from the outcomes, in one place.
"""
