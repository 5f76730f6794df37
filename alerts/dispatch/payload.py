"""The webhook body for one channel: the spec's document, minimised to what the channel needs.

A channel's ``fields`` select what it receives: top-level names ("alert") keep a whole part,
dotted names ("elder.medications", "elder.family_doctor.phone") keep one entry inside it.
An empty selection keeps everything (120 gets the whole document). The envelope a receiver
needs to deduplicate and to acknowledge (``dispatch_id``, ``attempt``, ``channel``,
``ack_url``) is always sent, whatever the selection.

Family contacts get no medication list (the spec's minimisation rule): a family channel's
default selection leaves it out, and it is removed from a family channel's body even when a
deployment's selection would take it. Family channels are the one named "family" and every
SMS gateway (an SMS reaches people's phones, which in the routes are the family contacts').
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from eldercare.alerts.dispatch.adapter import Channel

#: Always in the body: what a receiver deduplicates on, and where it acknowledges.
ENVELOPE = ("dispatch_id", "attempt", "channel", "ack_url")
#: A notice about an earlier dispatch (``superseded``): what it says, and which dispatch. No
#: personal data, so every channel gets it whatever its selection.
NOTICE = ("notice", "superseded_dispatch_id")

#: What a family channel gets when its ``fields`` are empty: enough to know who, what and where.
FAMILY_FIELDS = frozenset({"alert", "elder.id", "elder.name", "elder.location", "latest_vitals", "device"})
#: An SMS gateway also needs the contacts' numbers, which are where its texts go.
SMS_FIELDS = FAMILY_FIELDS | {"elder.emergency_contacts"}

#: Never in a family channel's body, whatever it is configured to receive.
FAMILY_NEVER = frozenset({"elder.medications"})

#: A selection as a tree: a name maps to True (the whole value) or to the names inside it.
_Tree = dict[str, Any]


def is_family(channel: Channel) -> bool:
    """Whether the channel reaches family contacts (so it never gets a medication list)."""
    return channel.name == "family" or channel.kind == "sms_gateway"


def fields_for(channel: Channel) -> frozenset[str]:
    """The channel's configured selection, or its default (empty = everything)."""
    if channel.fields:
        return channel.fields
    if channel.kind == "sms_gateway":
        return SMS_FIELDS
    if is_family(channel):
        return FAMILY_FIELDS
    return frozenset()


def minimise(document: Mapping[str, Any], fields: Iterable[str]) -> dict[str, Any]:
    """The parts of ``document`` that ``fields`` select (empty = all), as a new dict.

    A dotted name that reaches into something other than an object, or into a name the
    document does not have, selects nothing; an object left with nothing selected is left out.
    Selected values are shared with ``document``, not copied (the document is read-only here).
    """
    tree = _tree(fields)
    if not tree:
        return dict(document)
    return _select(document, tree)


def without(document: Mapping[str, Any], fields: Iterable[str]) -> dict[str, Any]:
    """``document`` less the (dotted) names in ``fields``, as a new dict; the rest is shared."""
    result = dict(document)
    for name in fields:
        head, _, rest = name.partition(".")
        if head not in result:
            continue
        if not rest:
            del result[head]
        elif isinstance(result[head], Mapping):
            result[head] = without(result[head], [rest])
    return result


def body(document: Mapping[str, Any], channel: Channel, attempt: int) -> bytes:
    """The request body (UTF-8 JSON) for ``channel``'s attempt number ``attempt``.

    The spec's order: ``dispatch_id``, ``attempt``, ``channel``, the selected parts, ``ack_url``.
    """
    selected = minimise(document, fields_for(channel))
    if is_family(channel):
        selected = without(selected, FAMILY_NEVER)
    out: dict[str, Any] = {
        "dispatch_id": document.get("dispatch_id"),
        "attempt": attempt,
        "channel": channel.name,
    }
    out.update((key, document[key]) for key in NOTICE if key in document)
    out.update((key, value) for key, value in selected.items() if key not in ENVELOPE and key not in NOTICE)
    if "ack_url" in document:
        out["ack_url"] = document["ack_url"]
    return orjson.dumps(out)


def _tree(fields: Iterable[str]) -> _Tree:
    """{"alert", "elder.medications"} -> {"alert": True, "elder": {"medications": True}}."""
    tree: _Tree = {}
    for name in fields:
        node = tree
        *parents, leaf = name.split(".")
        for part in parents:
            child = node.get(part)
            if child is True:
                break  # a whole part is already selected: the dotted name adds nothing
            node = node.setdefault(part, {})
        else:
            node[leaf] = True
    return tree


def _select(document: Mapping[str, Any], tree: _Tree) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, sub in tree.items():
        if key not in document:
            continue
        value = document[key]
        if sub is True:
            out[key] = value
        elif isinstance(value, Mapping):
            inner = _select(value, sub)
            if inner:
                out[key] = inner
    return out
