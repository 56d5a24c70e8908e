"""The encode-job protocol between gateways and the vision pool, over Redis (the jobs Redis: `--jobs-redis`, else
`--redis`).

- Jobs: stream `pixtral:jobs:encode`, consumer group `vision`. Any number of workers read it; each entry goes
  to one of them. An entry carries the image bytes, so any worker can take it; it is deleted once done.
- Liveness: each worker keeps `pixtral:vision:alive:{pixtral:jobs:encode}:<consumer>` alive (a short expiry,
  refreshed from its event loop). A job whose worker died stays pending; once that worker's key has expired another
  worker claims the job at once, and any job pending past `claim_idle_ms` is claimed whoever holds it. One delivered
  more than `max_deliveries` times moves to the dead-letter stream `pixtral:jobs:encode:dead`.
- Results: the worker publishes an EncodeResult on `pixtral:encoded:{pixtral:jobs:encode}:<fingerprint>`; a
  failure is also kept for a minute under `pixtral:encode-error:{pixtral:jobs:encode}:<fingerprint>:<sha256>` for
  waiters that subscribed late.
- Single flight: a gateway enqueues an image only while holding
  `pixtral:lock:encode:{pixtral:jobs:encode}:<fingerprint>:<sha256>` (SET NX with an expiry, so a dead holder blocks
  nobody for long); the worker deletes it when done.

On a Redis Cluster every key the claim script or the finishing transaction touches together must be in one slot:
the heartbeats, locks, error markers and the results channel carry the stream's name as their hash tag (`{...}`:
only that part is hashed), so they live in the stream's slot, on the node that serves it; the stream's own name
has no tag (its slot is that of its whole name). The results go out by sharded pub/sub there (SPUBLISH, see
shared/redis_client.py), in the same transaction. The dead-letter stream is written alone and may live anywhere.

Jobs and locks must live where nothing is evicted (see deploy/): only embeddings may be evicted. (Heartbeats
carry an expiry and are refreshed every second or so: the last keys an LRU picks; one evicted makes a live worker's
jobs look orphaned, so they may be encoded twice, never lost.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass

STREAM = "pixtral:jobs:encode"
GROUP = "vision"
# The hash tag of every key that must share the stream's slot on a cluster (see the module's docstring).
SLOT_TAG = "{" + STREAM + "}"
DEAD_LETTER_STREAM = "pixtral:jobs:encode:dead"
ERROR_TTL_S = 60

# Why an encode failed: the image itself (the request is wrong) or the pool (it gave up after retries).
INVALID_IMAGE = "invalid_image"
FAILED = "failed"


def done_channel(fingerprint: str) -> str:
    return f"pixtral:encoded:{SLOT_TAG}:{fingerprint}"


def lock_key(fingerprint: str, sha256: str) -> str:
    return f"pixtral:lock:encode:{SLOT_TAG}:{fingerprint}:{sha256}"


def error_key(fingerprint: str, sha256: str) -> str:
    return f"pixtral:encode-error:{SLOT_TAG}:{fingerprint}:{sha256}"


def heartbeat_key(consumer: str) -> str:
    """Exists while the worker of consumer `consumer` runs (it refreshes the key's expiry)."""
    return f"pixtral:vision:alive:{SLOT_TAG}:{consumer}"


class MalformedJob(ValueError):
    """A stream entry that is not an encode job (it goes to the dead-letter stream at once)."""


@dataclass(frozen=True, slots=True)
class EncodeJob:
    sha256: str        # lowercase hex sha256 of `image`
    fingerprint: str   # the model fingerprint the gateway expects the features under
    image: bytes       # the encoded image file
    request_id: str    # the request that asked first (for logs)

    def to_fields(self) -> dict[str, bytes | str]:
        return {"sha256": self.sha256, "fingerprint": self.fingerprint, "image": self.image,
                "request_id": self.request_id}

    @staticmethod
    def from_fields(fields: dict[bytes, bytes]) -> EncodeJob:
        try:
            return EncodeJob(sha256=fields[b"sha256"].decode("ascii"),
                             fingerprint=fields[b"fingerprint"].decode("ascii"),
                             image=fields[b"image"], request_id=fields.get(b"request_id", b"").decode())
        except (KeyError, UnicodeDecodeError) as error:
            raise MalformedJob(f"malformed encode job: {type(error).__name__}") from error


@dataclass(frozen=True, slots=True)
class EncodeResult:
    sha256: str
    error_kind: str = ""   # "" on success, else INVALID_IMAGE or FAILED
    message: str = ""      # what failed, safe to show to the caller

    @property
    def ok(self) -> bool:
        return not self.error_kind

    def to_json(self) -> str:
        return json.dumps({"sha256": self.sha256, "error_kind": self.error_kind, "message": self.message})

    @staticmethod
    def from_json(text: bytes | str) -> EncodeResult:
        data = json.loads(text)
        return EncodeResult(str(data["sha256"]), str(data.get("error_kind", "")), str(data.get("message", "")))
