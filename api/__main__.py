"""Command line: ``python -m api --index DIR --model PATH [--chat-model PATH] [--host H] [--port P]``.

Also ``--api-key KEY``, ``--device DEV``, ``--load-in 8bit|4bit``, ``--device-map auto`` and the batching /
limit knobs.

Every option falls back to its ``IVL_*`` environment variable (see :class:`api.settings.Settings`).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

import uvicorn

from api.app import create_app
from api.settings import Settings
from retrieval.devices import DTYPE_HELP, dtype_arg


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; unset ones stay None so environment variables apply."""
    p = argparse.ArgumentParser(prog="python -m api", description="Serve /search, /classify and /chat.")
    p.add_argument("--index", help="index directory (IVL_INDEX)")
    p.add_argument("--model", help="encoder checkpoint folder or 'demo' (IVL_MODEL)")
    p.add_argument(
        "--chat-model", help='InternVL-Chat folder or "demo"; /chat answers 503 without it (IVL_CHAT_MODEL)'
    )
    p.add_argument("--host", help="bind address, default 127.0.0.1 (IVL_HOST)")
    p.add_argument("--port", type=int, help="port, default 8000 (IVL_PORT)")
    p.add_argument("--api-key", help="require this key as Bearer token or X-API-Key (IVL_API_KEY)")
    p.add_argument("--device", help="torch device: cpu, cuda, cuda:1 ... (IVL_DEVICE)")
    p.add_argument(
        "--dtype",
        type=dtype_arg,
        metavar="DTYPE",
        help=DTYPE_HELP,
    )
    p.add_argument(
        "--load-in",
        choices=("8bit", "4bit"),
        help="chat model's language model in 8 or 4 bit; needs bitsandbytes and CUDA (IVL_LOAD_IN)",
    )
    p.add_argument(
        "--device-map",
        help="chat model placement: auto (split over GPUs), balanced, sequential, a device or a JSON map;"
        " default one device, auto when it does not fit (IVL_DEVICE_MAP)",
    )
    p.add_argument(
        "--cors-origins", help="comma-separated allowed CORS origins; off by default (IVL_CORS_ORIGINS)"
    )
    p.add_argument(
        "--max-body-bytes", type=int, help="request body limit, default 20 MiB (IVL_MAX_BODY_BYTES)"
    )
    p.add_argument("--max-pixels", type=int, help="decoded image pixel limit (IVL_MAX_PIXELS)")
    batching = p.add_mutually_exclusive_group()
    batching.add_argument(
        "--batching",
        dest="batching",
        action="store_true",
        default=None,
        help="micro-batch concurrent encodes (default; IVL_BATCHING)",
    )
    batching.add_argument(
        "--no-batching", dest="batching", action="store_false", help="encode one request at a time"
    )
    p.add_argument("--max-batch-size", type=int, help="largest encoder batch (IVL_MAX_BATCH_SIZE)")
    p.add_argument("--max-wait-ms", type=float, help="longest wait to fill a batch (IVL_MAX_WAIT_MS)")
    p.add_argument(
        "--reload-interval-s", type=float, help="manifest check period, 0 = off (IVL_RELOAD_INTERVAL_S)"
    )
    p.add_argument(
        "--served-model-name", help="chat model id on /v1, default its folder's name (IVL_SERVED_MODEL_NAME)"
    )
    p.add_argument(
        "--allowed-media-domains",
        help="comma-separated hosts whose http(s) image URLs /v1 may fetch (IVL_ALLOWED_MEDIA_DOMAINS)",
    )
    p.add_argument("--log-level", help="debug, info, warning (IVL_LOG_LEVEL)")
    return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Environment-based settings overridden by the options that were given."""
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    return Settings(**overrides)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse options, build the app and run uvicorn (single process: models load once)."""
    settings = settings_from_args(parse_args(argv))
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-variant probing reads like errors
    if not settings.index or not settings.model:
        raise SystemExit("error: --index DIR and --model PATH are required (or IVL_INDEX / IVL_MODEL)")
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level.lower()
    )


if __name__ == "__main__":
    main()
