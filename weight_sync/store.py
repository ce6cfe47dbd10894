"""The rendezvous store: a TCPStore hosted by the sender, bound to one chosen address."""

from __future__ import annotations

import datetime
import socket

import torch.distributed as dist

from weight_sync.errors import WeightSyncError

__all__ = ["host_store", "join_store", "free_local_address", "wait_get"]


def host_store(host: str, world_size: int, timeout_s: float, key: str):
    """Starts a store server listening on ``host`` only, on a port the OS picks.

    TCPStore on its own listens on every interface; handing it a socket we bound ourselves is
    how the address is chosen explicitly (loopback on a single node).

    Returns:
        ``(store, port, listen_socket)``: the store under the per-run prefix ``key``, the port,
        and the socket (keep a reference for as long as the store lives).

    Raises:
        WeightSyncError: The address could not be bound, or the store did not start (names it).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    port = 0
    try:
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
    except Exception as exc:  # noqa: BLE001 - OSError, RuntimeError or DistStoreError
        sock.close()
        raise WeightSyncError(
            f"could not host the store on {host}:{port or '<any port>'}: "
            f"{type(exc).__name__}: {exc}",
            peer=f"{host}:{port}",
        ) from exc
    return dist.PrefixStore(f"{key}/", store), port, sock


def join_store(host: str, port: int, world_size: int, timeout_s: float, key: str):
    """Connects to a store started by :func:`host_store`; same prefix, same timeout.

    Raises:
        WeightSyncError: The store did not answer within ``timeout_s`` (names its address).
    """
    try:
        store = dist.TCPStore(host, port, world_size, False, datetime.timedelta(seconds=timeout_s))
    except Exception as exc:  # noqa: BLE001 - DistNetworkError, DistStoreError, RuntimeError
        raise WeightSyncError(
            f"could not reach the store at {host}:{port} within {timeout_s:g} s: "
            f"{type(exc).__name__}: {exc}",
            peer=f"{host}:{port}",
        ) from exc
    return dist.PrefixStore(f"{key}/", store)


def wait_get(
    store,
    key: str,
    timeout_s: float,
    what: str,
    *,
    peer: str | None = None,
    bucket: int | None = None,
) -> bytes:
    """The value of ``key`` once it is set, waiting at most ``timeout_s``.

    Raises:
        WeightSyncError: Nobody set it in time, or the store failed (``what`` says what was
            waited for, ``peer`` who should have set it, ``bucket`` the bucket concerned).
    """
    try:
        store.wait([key], datetime.timedelta(seconds=timeout_s))
        return store.get(key)
    except Exception as exc:  # noqa: BLE001 - the store raises RuntimeError/DistStoreError
        source = f" from the {peer}" if peer else ""
        raise WeightSyncError(
            f"{what}: no answer{source} within {timeout_s:g} s ({exc})", peer=peer, bucket=bucket
        ) from exc


def free_local_address(multi_node: bool) -> str:
    """The address a sender binds its store to: loopback unless peers are on other nodes."""
    if not multi_node:
        return "127.0.0.1"
    import ray

    return ray.util.get_node_ip_address()
