"""`batchworker dashboard`: serve the read-only web dashboard on this machine (loopback unless --host)."""

from __future__ import annotations

import ipaddress
import socket
import threading
import webbrowser

from rich.console import Console

from batchworker.cli.client import FIELDS, Deployment, resolve

err = Console(stderr=True)
LOOPBACK = "127.0.0.1"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("dashboard", help="a live web page of jobs, instances, cost and queues (read-only)")
    p.add_argument("--port", type=int, default=8471, help="port to listen on (default: 8471; 0 picks a free one)")
    p.add_argument("--host", default=LOOPBACK,
                   help="address to listen on (default: 127.0.0.1; anything else exposes the page to that network)")
    p.add_argument("--open", action="store_true", help="open the page in the default browser")
    p.add_argument("--refresh-seconds", type=float, default=5.0, help="how often pages update (default: 5)")
    p.add_argument("--instance-type", help="price as this type (default: the pool's own type)")
    p.add_argument("--hourly-price-dollars", type=float, help="price per instance-hour (default: on-demand us-east-1)")
    p.set_defaults(command=cmd_dashboard)


def cmd_dashboard(args) -> int:
    deployment = resolve({name: getattr(args, name, None) for name in FIELDS})
    server = make_server(deployment, args.host, args.port, args.refresh_seconds, args.instance_type,
                         args.hourly_price_dollars)
    url = f"http://{_url_host(args.host)}:{server.server_port}/"
    err.print(f"dashboard of pool {deployment.pool_tag!r}, read-only; Ctrl-C stops it")
    print(url, flush=True)
    if not is_loopback(args.host):
        err.print(f"[yellow]warning:[/yellow] listening on {args.host}: anyone who reaches it sees your jobs")
    if args.open:
        threading.Timer(0.5, webbrowser.open, args=(url,)).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def make_server(
    deployment: Deployment,
    host: str = LOOPBACK,
    port: int = 0,
    refresh_seconds: float = 5.0,
    instance_type: str | None = None,
    hourly_price_dollars: float | None = None,
):
    """A threaded WSGI server for the dashboard app (not started); port 0 picks a free port."""
    # Imported here: every other command starts without loading Flask.
    from werkzeug.serving import make_server as werkzeug_server

    from batchworker.dashboard.app import create_app

    app = create_app(deployment, refresh_seconds, instance_type, hourly_price_dollars, trusted_hosts(host))
    return werkzeug_server(host, port, app, threaded=True)


def trusted_hosts(host: str) -> list[str] | None:
    """Host headers to serve: loopback names by default; the bound name too; any on a wildcard bind."""
    if is_loopback(host):
        return None
    if host in ("0.0.0.0", "::"):
        return []
    return [host, socket.gethostname(), socket.getfqdn(), "127.0.0.1", "localhost"]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::"):
        return LOOPBACK
    return f"[{host}]" if ":" in host else host
