"""The `serve` command: load the model, start the engine, run uvicorn until SIGTERM or Ctrl-C.

SIGTERM drains: the listening socket closes, requests in flight get `drain_timeout` seconds to finish, what
is left is cancelled (its rows leave the batch at the next decoder pass; its stream ends with a 503 error event),
and the process exits 0. Imported only when `serve` runs (uvicorn and the model come with it).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import sys

import uvicorn

from .errors import UsageError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _DrainingServer(uvicorn.Server):
    """On shutdown: stop taking requests, give those in flight `drain` seconds, then end them (503)."""

    def __init__(self, config: uvicorn.Config, state, drain: float):
        super().__init__(config)
        self.state, self.drain = state, drain

    async def shutdown(self, sockets=None) -> None:
        self.state.closing = True
        asyncio.get_running_loop().call_later(self.drain, self.state.engine.abort_all)
        await super().shutdown(sockets)


def run_serve(model: str, *, host: str, port: int, api_key: str | None, drafter: str, max_tokens: int | None,
              max_tokens_limit: int, decode_concurrency: int, max_queue: int, prompt_cache_bytes: int,
              chat_template_args: str | None, dtype: str | None, adapter_path: str | None, drain_timeout: float,
              log_level: str) -> None:
    """Check the flags, load the model, serve until told to stop."""
    from .cluster import refuse_split
    from .console import parse_template_config, reply_length
    from .drafter import drafter_for
    from .engine import Engine
    from .loader import load
    from .server import ServeOptions, State, create_app

    refuse_split("serve")
    for name, value in (("--decode-concurrency", decode_concurrency), ("--max-tokens-limit", max_tokens_limit)):
        if value < 1:
            raise UsageError(f"{name} must be at least 1 (got {value})")
    if max_queue < 0 or prompt_cache_bytes < 0 or drain_timeout < 0:
        raise UsageError("--max-queue, --prompt-cache-bytes and --drain-timeout cannot be negative")
    if not 0 <= port < 65536:
        raise UsageError(f"--port must be in 0..65535 (got {port})")
    template_args = parse_template_config(chat_template_args) or {}
    if not is_loopback(host) and api_key is None:
        print(f"warning: serving on {host}, beyond this machine, without --api-key: anyone who can reach it can "
              "use the model", file=sys.stderr)
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s: %(message)s")
    engine = Engine(lambda: load(model, dtype=dtype, adapter_path=adapter_path), max_batch=decode_concurrency,
                    max_queue=max_queue, prefix_cache_bytes=prompt_cache_bytes)
    m, tokenizer = engine.start()
    try:
        drafter_for(m, drafter)  # fail now, not at the first request
    except Exception:
        engine.close()
        raise
    options = ServeOptions(model_id=model, drafter=drafter, api_key=api_key, max_tokens=reply_length(m, max_tokens),
                           max_tokens_limit=max_tokens_limit, template_args=template_args)
    state = State(m, tokenizer, engine, options)
    # uvicorn's own bound is a backstop: the drain ends every stream cleanly before it.
    config = uvicorn.Config(create_app(state), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=drain_timeout + 10, access_log=log_level == "debug")
    server = _DrainingServer(config, state, drain_timeout)
    # uvicorn re-raises SIGTERM once its graceful shutdown is over; this handler makes that a clean exit 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        state.closing = True
        engine.close()  # joins the engine thread, which synchronizes its stream and drops its arrays first
    # Drained and stopped: exit now, not through the interpreter's teardown. MLX's C++ stream workers, made on
    # the engine's (finished) thread, still abort in static destructors now and then ("terminate called
    # without an active exception": CI saw it twice in one run even with the clean-up above).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
