"""The director: signs which release each device should run (its *desired state*), with an online key.

The envelope is ``{"signed": {...}, "signatures": [{"keyid", "sig"}]}``, the signature taken over
``agent.canonical.canonical_json(signed)``. Devices verify it with
``agent.update.desired.verify_desired``; the fleet runs the
device's own field checks before signing, so it never signs a state a device would reject as malformed. A director
signature alone installs nothing: the device also requires TUF's targets metadata to list the same target.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from securesystemslib.signer import Signer

from agent.canonical import canonical_json
from agent.protocol import MAX_PAYLOAD_BYTES, SCHEMA_VERSION
from agent.update.desired import DESIRED_TYPE, DesiredStateError, check_signed


def sign_desired(
    director_signer: Signer,
    device_id: str,
    seq: int,
    models: Mapping[str, Mapping[str, Any]],
    campaign: str | None,
    issued: float,
    expires: float,
) -> bytes:
    """Return the signed desired-state payload for one device (published retained on its ``desired`` topic).

    ``models`` maps model name to ``{"target", "release", "sha256", "length"}`` (``ReleaseInfo.desired_entry()``);
    ``seq`` must grow with every new state for the device. Raises ``DesiredStateError`` for a malformed state.
    """
    signed = {
        "v": SCHEMA_VERSION,
        "type": DESIRED_TYPE,
        "device_id": device_id,
        "seq": seq,
        "issued": issued,
        "expires": expires,
        "campaign": campaign,
        "models": {name: dict(entry) for name, entry in models.items()},
    }
    check_signed(signed)
    signature = director_signer.sign(canonical_json(signed))
    payload = canonical_json({"signed": signed, "signatures": [{"keyid": signature.keyid, "sig": signature.signature}]})
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise DesiredStateError("oversized", f"{len(payload)} bytes")
    return payload
