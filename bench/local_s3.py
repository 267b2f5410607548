"""A real S3-compatible server on 127.0.0.1 for tests and benchmarks: moto's server (PyPI
``moto[server]``, a test dependency), one bucket, and the standard AWS environment variables
(``AWS_ENDPOINT_URL``, keys, region) pointing at it for this process and the ones it starts.

    from bench.local_s3 import local_s3
    with local_s3(Path("/tmp/s3.log")) as server:      # server.endpoint, server.requests()
        prepare("lits", src, "s3://hpc-seg/lits.zarr")

The server logs one line per HTTP request; ``requests()`` counts them by method, which is how
``bench/object_store.py`` measures requests per sample as the server sees them.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
METHODS = ("GET", "HEAD", "PUT", "POST", "DELETE")


class Server:
    def __init__(self, endpoint: str, log: Path):
        self.endpoint, self.log = endpoint, log

    def requests(self, settle: float = 0.3) -> Counter:
        """Requests the server has logged so far, by HTTP method (after ``settle`` seconds: a request
        is logged just after its response is sent)."""
        time.sleep(settle)
        counts = Counter()
        text = re.sub(r"\x1b\[[0-9;]*m", "", self.log.read_text(errors="replace"))  # werkzeug colours
        for line in text.splitlines():
            for m in METHODS:
                if f'"{m} /' in line:
                    counts[m] += 1
        return counts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_s3(log: Path, bucket: str = "hpc-seg"):
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ENV}
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"the local S3 server did not start: {log.read_text()[-2000:]}")
                time.sleep(0.1)
        os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{bucket}", method="PUT"), timeout=10)
        yield Server(endpoint, log)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
