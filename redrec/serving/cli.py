"""``redrec serving ...``: store a model version, serve locally, build the bento."""

from __future__ import annotations

import signal
import time


def cmd_save_model(args) -> int:
    from redrec.serving.registry import save_model

    try:
        tag = save_model(args.checkpoint, args.version)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}")
        return 2
    print(f"stored {tag}")
    return 0


def cmd_serve(args) -> int:
    from redrec.serving.config import ConfigError, ServingConfig
    from redrec.serving.local import LocalServer

    try:
        cfg = ServingConfig.from_yaml(args.config)
    except ConfigError as e:
        print(f"error: {e}")
        return 2
    srv = LocalServer(args.config, port=args.port or cfg.serving.port)
    srv.start(timeout_s=args.timeout)
    print(f"serving on {srv.url} (OpenAPI: {srv.url}/docs); Ctrl-C stops", flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop and srv.alive():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    srv.stop()
    return 0


def cmd_build(args) -> int:
    from redrec.serving.local import build_bento

    print(build_bento(models=args.model or None, version=args.version))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("serving", help="BentoML serving: models, local server, bento build")
    sub = p.add_subparsers(dest="serving_command", required=True)
    s = sub.add_parser("save-model", help="store an exported checkpoint as BentoML model redrec:<version>")
    s.add_argument("--checkpoint", required=True, help="export_checkpoint output dir (<out_dir>/<variant>/model)")
    s.add_argument("--version", required=True)
    s.set_defaults(func=cmd_save_model)
    s = sub.add_parser("serve", help="run `bentoml serve` on 127.0.0.1 with a serving config")
    s.add_argument("--config", required=True)
    s.add_argument("--port", type=int)
    s.add_argument("--timeout", type=float, default=300.0)
    s.set_defaults(func=cmd_serve)
    s = sub.add_parser("build", help="`bentoml build` offline; prints the bento tag")
    s.add_argument("--model", action="append", help="BentoML model tag to pack (repeatable), e.g. redrec:v1")
    s.add_argument("--version")
    s.set_defaults(func=cmd_build)
