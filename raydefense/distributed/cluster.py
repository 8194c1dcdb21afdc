"""Start or join Ray. A cluster address that does not answer gets a clear message within seconds,
not a hang; a Ray instance we started is shut down when we leave, one we joined is left running."""

from __future__ import annotations

import logging
import os
import socket
import sys
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
    except socket.gaierror as exc:
        raise UserError(f"cannot resolve the cluster host {host!r} in {address} ({exc.strerror or exc})") from None
    except ConnectionRefusedError:
        raise UserError(f"no Ray cluster at {address}: connection refused (is the head node up? "
                        "ray start --head listens on 6379 by default)") from None
    except OSError as exc:
        raise UserError(f"Ray cluster at {address} does not answer within {timeout:.0f}s ({exc.strerror or exc})") from None


DASHBOARD_EXTRA = "pip install 'ray[default]==2.60.*'"


def dashboard_missing() -> str | None:
    """Why Ray's dashboard cannot start here (None: it can). ray[tune,train] alone is Ray's
    minimal install: the dashboard's web server needs the ray[default] extra (aiohttp, grpcio,
    opencensus, prometheus_client, ...)."""
    try:
        from ray._private.utils import get_dashboard_dependency_error

        error = get_dashboard_dependency_error()
    except ImportError as exc:  # a Ray without this private helper: let ray.init decide
        log.debug("cannot check dashboard dependencies: %s", exc)
        return None
    return f"the Ray dashboard needs ray[default] ({error}); {DASHBOARD_EXTRA}" if error else None


def check_dashboard_host(host: str) -> str:
    """A literal IP or 'localhost'; 0.0.0.0 exposes the dashboard (and job submission) to the network."""
    import ipaddress

    if host == "localhost":
        return "127.0.0.1"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise UserError(f"--dashboard-host must be an IP address such as 127.0.0.1 or 0.0.0.0, got {host!r}") from None
    return host


def _check_client_address(address: str) -> None:
    if address.startswith("ray://"):
        try:
            import grpc  # noqa: F401
        except ImportError:
            raise UserError(f"{address}: ray:// addresses use Ray Client, which needs pip install 'ray[client]==2.60.*'; "
                            "or run the command on the cluster (ray job submit) with --address auto") from None


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence Ray's C++ client warnings (written to fd 2, one per retry) during a probe."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _probe_gcs(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Something answers TCP at ``address``; make sure it is a Ray head (its GCS), within ``timeout``.

    Without this, ray.init retries for about 20 s against a port that is not Ray, logging a warning
    each second."""
    if address in ("auto", "local") or "://" in address:
        return
    try:
        from ray._raylet import InnerGcsClient
    except ImportError:  # a Ray without this private API: ray.init's own (slower) failure applies
        return
    try:
        with _quiet_stderr():
            InnerGcsClient.standalone(address, None, int(timeout * 1000))
    except Exception as exc:  # noqa: BLE001 - RpcError is not importable by name across versions
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "authenticat" in first.lower() or "unauthenticated" in first.lower():
            raise UserError(token_message(address, first)) from None
        raise UserError(f"{address} answers but is not a Ray cluster head (GCS): {first}") from None


def token_message(address: str, detail: str) -> str:
    log.debug("token authentication failed at %s: %s", address, detail)
    return (f"the Ray cluster at {address} uses token authentication and refused this client's token "
            "(missing or incorrect); "
            "run `ray get-auth-token` on the head node and set RAY_AUTH_TOKEN=<token> here "
            "(or copy its ~/.ray/auth_token)")


@contextmanager
def ray_cluster(address: str | None = None, num_cpus: int | None = None, num_gpus: float | None = None,
                dashboard: bool = False, dashboard_host: str = "127.0.0.1") -> Iterator[dict]:
    """Yield Ray's context info; join ``address`` (or RAY_ADDRESS) or start a local instance.

    Keys: started (we started Ray), dashboard_url (None when there is none), dashboard_note (why not).
    """
    import ray

    if ray.is_initialized():
        yield {"started": False, "dashboard_url": None, "dashboard_note": None}
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = dict(logging_level=logging.WARNING, log_to_driver=False, configure_logging=False)
    note = None
    if address:
        _check_client_address(address)
        _probe(address)
        _probe_gcs(address)
        try:
            ctx = ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ray.exceptions.RayError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if "authenticat" in first.lower():
                raise UserError(token_message(address, first)) from None
            raise UserError(f"cannot join the Ray cluster at {address}: {first}") from None
    else:
        if dashboard:
            dashboard_host = check_dashboard_host(dashboard_host)
            note = dashboard_missing()
        ctx = ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=dashboard and note is None,
                       dashboard_host=dashboard_host, **kwargs)
    url = getattr(ctx, "dashboard_url", None) or None
    try:
        yield {"started": not address, "dashboard_url": f"http://{url}" if url and "://" not in url else url,
               "dashboard_note": note}
    finally:
        ray.shutdown()
