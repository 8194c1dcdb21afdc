"""Start or join Ray. A cluster address that does not answer gets a clear message within seconds,
not a hang; a Ray instance we started is shut down when we leave, one we joined is left running."""

from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager
from typing import Iterator
from urllib.parse import urlparse

from raydefense.errors import UserError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0


def _probe(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast if host:port (or ray://host:port) does not accept TCP connections."""
    if address in ("auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    host, port = parsed.hostname, parsed.port
    if not host or not port:
        raise UserError(f"cannot read cluster address {address!r}; write host:port, ray://host:port or auto")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise UserError(f"Ray cluster at {address} does not answer within {timeout:.0f}s ({exc.strerror or exc})") from None


@contextmanager
def ray_cluster(address: str | None = None, num_cpus: int | None = None, num_gpus: float | None = None,
                dashboard: bool = False, dashboard_host: str = "127.0.0.1") -> Iterator[dict]:
    """Yield Ray's context info; join ``address`` (or RAY_ADDRESS) or start a local instance."""
    import ray

    if ray.is_initialized():
        yield {"started": False, "dashboard_url": None}
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = dict(logging_level=logging.WARNING, log_to_driver=False, configure_logging=False)
    if address:
        _probe(address)
        try:
            ctx = ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError) as exc:
            raise UserError(f"cannot join the Ray cluster at {address}: {str(exc).splitlines()[0]}") from None
    else:
        ctx = ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=dashboard,
                       dashboard_host=dashboard_host, **kwargs)
    url = getattr(ctx, "dashboard_url", None) or None
    try:
        yield {"started": not address, "dashboard_url": f"http://{url}" if url and "://" not in url else url}
    finally:
        ray.shutdown()
