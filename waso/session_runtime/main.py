"""The session runtime process: the runtime, its HTTP API, and a clean stop on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from waso.kube import KubeClient
from waso.session_runtime.config import RuntimeConfig
from waso.session_runtime.http import build_app
from waso.session_runtime.runtime import Runtime

log = logging.getLogger("waso.runtime")


async def serve(config: RuntimeConfig) -> None:
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(config.executor_threads, thread_name_prefix="transport"))
    kube = KubeClient.connect(threads=16)
    runtime = Runtime(config, kube)
    await runtime.start()
    runner = web.AppRunner(build_app(runtime), shutdown_timeout=2)
    await runner.setup()
    site = web.TCPSite(runner, config.http_host, config.http_port)
    await site.start()
    log.info(
        "runtime for %s shard %d on %s:%d (transport %s), instance %s",
        config.namespace, config.shard_index, config.http_host, config.http_port, config.transport, config.instance,
    )  # fmt: skip
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: %d session(s)", len(runtime.sessions))
    await runtime.stop()
    await runner.cleanup()
    kube.close()
