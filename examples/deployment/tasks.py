"""Tasks for the config-file deployment in this folder.

The code says what each task does; ``tether.toml`` says how this deployment runs it (where,
how many at once, how long, how often to retry), so operators tune it without editing code::

    cd examples/deployment
    export PYTHONPATH=../..      # the folder that holds the `examples` package
    tether server                # [server] from ./tether.toml
    tether worker                # [worker] and [functions."..."] from ./tether.toml
    tether submit examples.deployment.tasks.checksum hello --wait
"""

from __future__ import annotations

import hashlib
import string

from tether import Tether

app = Tether()


@app.task
def checksum(text: str, rounds: int = 10_000) -> str:
    """Pure-Python CPU work; ``auto`` finds this module loads in a subinterpreter."""
    data = text.encode()
    for _ in range(rounds):
        data = hashlib.sha256(data).digest()
    return data.hex()


@app.task(retries=1)
def render(template: str, values: dict[str, str]) -> str:
    """Fill a ``$name`` template; tether.toml moves it to a process and gives it a timeout."""
    return string.Template(template).substitute(values)
