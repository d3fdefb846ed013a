"""moto in server mode as a subprocess on a loopback address: a real HTTP endpoint for the
AWS APIs, so Cloud Map calls go over the wire as they do in ECS.

    with running_moto("127.0.0.1", free_port("127.0.0.1"), log_path) as url:
        ...  # boto3 clients with endpoint_url=url and dummy credentials
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@contextlib.contextmanager
def running_moto(host: str, port: int, log_path: Path, timeout: float = 30.0) -> Iterator[str]:
    """`python -m moto.server` on host:port until the block ends; its base URL."""
    url = f"http://{host}:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
            stdout=log_file, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with NO_PROXY_OPENER.open(url + "/moto-api/", timeout=1.0):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto did not start:\n{log_path.read_text()}") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def admin_client(url: str, region: str = "us-east-1", config: Any = None) -> Any:
    """A servicediscovery client with dummy credentials (setting moto up: namespaces,
    services, instances; or calling it as a test client, with a botocore `config`)."""
    import boto3

    return boto3.session.Session().client(
        "servicediscovery",
        region_name=region,
        endpoint_url=url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=config,
    )
