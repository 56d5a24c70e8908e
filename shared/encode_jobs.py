"""The encode-job protocol between gateways and the vision pool, over Redis.

- Jobs: stream `pixtral:jobs:encode`, consumer group `vision`. Any number of workers read it; each entry goes
  to one of them. An entry carries the image bytes, so any worker can take it; it is deleted once done.
- Liveness: each worker keeps `pixtral:vision:alive:<consumer>` alive (a short expiry, refreshed from its event
  loop). A job whose worker died stays pending; once that worker's key has expired another worker claims the job
  at once, and any job pending past `claim_idle_ms` is claimed whoever holds it. One delivered more than
  `max_deliveries` times moves to the dead-letter stream `pixtral:jobs:encode:dead`.
- Results: the worker publishes an EncodeResult on `pixtral:encoded:<fingerprint>`; a failure is also kept
  for a minute under `pixtral:encode-error:<fingerprint>:<sha256>` for waiters that subscribed late.
- Single flight: a gateway enqueues an image only while holding `pixtral:lock:encode:<fingerprint>:<sha256>`
  (SET NX with an expiry, so a dead holder blocks nobody for long); the worker deletes it when done.

Jobs and locks must live where nothing is evicted (see deploy/): only embeddings may be evicted. (Heartbeats
carry an expiry and are refreshed every second or so: the last keys an LRU picks; one evicted makes a live worker's
jobs look orphaned, so they may be encoded twice, never lost.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass

STREAM = "pixtral:jobs:encode"
GROUP = "vision"
DEAD_LETTER_STREAM = "pixtral:jobs:encode:dead"
ERROR_TTL_S = 60

# Why an encode failed: the image itself (the request is wrong) or the pool (it gave up after retries).
INVALID_IMAGE = "invalid_image"
FAILED = "failed"


def done_channel(fingerprint: str) -> str:
    return f"pixtral:encoded:{fingerprint}"


def lock_key(fingerprint: str, sha256: str) -> str:
    return f"pixtral:lock:encode:{fingerprint}:{sha256}"


def error_key(fingerprint: str, sha256: str) -> str:
    return f"pixtral:encode-error:{fingerprint}:{sha256}"


def heartbeat_key(consumer: str) -> str:
    """Exists while the worker of consumer `consumer` runs (it refreshes the key's expiry)."""
    return f"pixtral:vision:alive:{consumer}"


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
