"""``edge-shitu serve``: the kiosk service and its browser UI (the ``kiosk`` extra: Starlette + uvicorn)."""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

from edge_shitu.cli.common import EXIT_OK, add_image_limit, add_threads, heavy, missing_extra, whole_number

__all__ = ["register"]

# Connections served at once; more wait for a 503 from uvicorn instead of holding a body each in memory.
_MAX_CONNECTIONS = 32


def register(subparsers, groups) -> None:
    """Adds ``serve`` to the top-level commands."""
    p = subparsers.add_parser(
        "serve", help="run the kiosk: a local recognition service with a browser UI"
                      + missing_extra("kiosk", ("starlette", "uvicorn")),
        description="Serves the recognition API and the browser UI (live camera, enrolment, gallery, settings) "
                    "on one bundle and one gallery, created when missing. Bound to 127.0.0.1 by default; any "
                    "other address needs a token (generated into --token-file when that file does not exist). "
                    "The API is described in docs/kiosk.md.")
    p.add_argument("--bundle", required=True, help="bundle folder or one-file bundle (.esb)")
    p.add_argument("--gallery", required=True, help="the gallery file (created when missing)")
    p.add_argument("--compact", choices=["int8", "fp16", "none"], default="int8",
                   help="compact features a gallery created by serve keeps for re-ranked search (default int8: "
                        "float search's recall@1 for d+4 bytes per item; none: codes only); an existing gallery "
                        "keeps its own (see `gallery compact`)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this device only)")
    p.add_argument("--port", type=whole_number(1, 65535), default=8000, help="port (default 8000)")
    p.add_argument("--token-file", type=Path, default=None,
                   help="file holding the API token (mode 0600); generated when missing. Required for a "
                        "non-loopback --host; default then $XDG_STATE_HOME/edge-shitu/token")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="another host name clients may use in the Host header (repeatable), e.g. kiosk.lan")
    p.add_argument("--max-body", type=whole_number(1024), default=None, metavar="BYTES",
                   help="largest request body (default 8 MiB)")
    add_threads(p)
    add_image_limit(p)
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args, out: TextIO, err: TextIO) -> int:
    heavy("starlette", "kiosk")
    uvicorn = heavy("uvicorn", "kiosk")
    from edge_shitu.kiosk.app import DEFAULT_MAX_BODY, create_app
    from edge_shitu.kiosk.security import allowed_hosts, default_token_path, is_loopback, load_or_create_token
    from edge_shitu.kiosk.service import KioskService, ServiceOptions

    token = None
    token_file = args.token_file
    if token_file is None and not is_loopback(args.host):
        token_file = default_token_path()
    if token_file is not None:
        token, created = load_or_create_token(token_file)
        err.write(f"edge-shitu serve: token {'generated into' if created else 'read from'} {token_file}; "
                  "clients send it as 'Authorization: Bearer TOKEN', the UI takes it once from "
                  "http://HOST:PORT/#token=TOKEN\n")
    hosts = allowed_hosts(args.host, args.allow_host)
    options = ServiceOptions(threads=args.threads, max_pixels=args.max_pixels,
                             compact=None if args.compact == "none" else args.compact)
    with KioskService.open(args.bundle, args.gallery, options=options) as service:
        app = create_app(service, token=token, hosts=hosts, max_body=args.max_body or DEFAULT_MAX_BODY)
        if service.bundle.is_replica:
            err.write("edge-shitu serve: this bundle is a replica (random weights): its recognitions mean nothing\n")
        host = f"[{args.host}]" if ":" in args.host else args.host
        err.write(f"edge-shitu serve: http://{host}:{args.port}/ (gallery {args.gallery}, "
                  f"{len(service.gallery)} items); Ctrl-C stops\n")
        err.flush()
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                limit_concurrency=_MAX_CONNECTIONS, timeout_keep_alive=30,
                                server_header=False, proxy_headers=False)
        uvicorn.Server(config).run()
    return EXIT_OK
