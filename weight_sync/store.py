"""The rendezvous store: a TCPStore hosted by the sender, bound to one chosen address."""

from __future__ import annotations

import datetime
import socket

import torch.distributed as dist

__all__ = ["host_store", "join_store", "free_local_address", "wait_get"]


def host_store(host: str, world_size: int, timeout_s: float, key: str):
    """Starts a store server listening on ``host`` only, on a port the OS picks.

    TCPStore on its own listens on every interface; handing it a socket we bound ourselves is
    how the address is chosen explicitly (loopback on a single node).

    Returns:
        ``(store, port, listen_socket)``: the store under the per-run prefix ``key``, the port,
        and the socket (keep a reference for as long as the store lives).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    store = dist.TCPStore(
        host,
        port,
        world_size,
        True,
        datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
        master_listen_fd=sock.fileno(),
    )
    return dist.PrefixStore(f"{key}/", store), port, sock


def join_store(host: str, port: int, world_size: int, timeout_s: float, key: str):
    """Connects to a store started by :func:`host_store`; same prefix, same timeout."""
    store = dist.TCPStore(host, port, world_size, False, datetime.timedelta(seconds=timeout_s))
    return dist.PrefixStore(f"{key}/", store)


def wait_get(store, key: str, timeout_s: float, what: str) -> bytes:
    """The value of ``key`` once it is set, waiting at most ``timeout_s``.

    Raises:
        WeightSyncError: Nobody set it in time (``what`` says what was waited for).
    """
    from weight_sync.errors import WeightSyncError

    try:
        store.wait([key], datetime.timedelta(seconds=timeout_s))
        return store.get(key)
    except Exception as exc:  # noqa: BLE001 - the store raises RuntimeError/DistStoreError
        raise WeightSyncError(f"{what}: no answer within {timeout_s:g} s ({exc})") from exc


def free_local_address(multi_node: bool) -> str:
    """The address a sender binds its store to: loopback unless peers are on other nodes."""
    if not multi_node:
        return "127.0.0.1"
    import ray

    return ray.util.get_node_ip_address()
