"""Messages from rank 0 to the rest of a service's world: rank 0 serves HTTP, and before
it runs a piece of work it broadcasts the work's bytes, so every rank runs it on the same
input and their collectives (TP all-reduces and all-gathers) line up. A message is
(kind, name, body): CALL carries work, KEEPALIVE keeps idle followers inside the process
group's timeout, STOP ends them. Bytes only: nothing a follower receives is unpickled."""

from __future__ import annotations

import torch
import torch.distributed as dist

from offline_rlhf.runtime import Runtime

STOP, KEEPALIVE, CALL = 0, 1, 2
KEEPALIVE_S = 60.0  # an idle rank 0 broadcasts this often; far below any process-group timeout


def broadcast_message(rt: Runtime, kind: int, endpoint: str = "", body: bytes = b"") -> None:
    """Rank 0: send (kind, endpoint, body) to every rank of the runtime's world."""
    if rt.group is None:
        return
    name = endpoint.encode()
    header = torch.tensor([kind, len(name), len(body)], dtype=torch.int64, device=rt.device)
    dist.broadcast(header, src=0, group=rt.group)
    if name or body:
        data = torch.frombuffer(bytearray(name + body), dtype=torch.uint8).to(rt.device)
        dist.broadcast(data, src=0, group=rt.group)


def receive_message(rt: Runtime) -> tuple[int, str, bytes]:
    """Ranks other than 0: the next (kind, endpoint, body) rank 0 broadcasts."""
    header = torch.zeros(3, dtype=torch.int64, device=rt.device)
    dist.broadcast(header, src=0, group=rt.group)
    kind, name_len, body_len = header.tolist()
    if not name_len + body_len:
        return kind, "", b""
    data = torch.empty(name_len + body_len, dtype=torch.uint8, device=rt.device)
    dist.broadcast(data, src=0, group=rt.group)
    raw = data.cpu().numpy().tobytes()
    return kind, raw[:name_len].decode(), raw[name_len:]
