"""Remove a detached `--rm` sandbox once its container has exited."""

from __future__ import annotations

import sys

from ember.api import Sandbox
from ember.errors import EmberError


def main(sandbox_id: str) -> None:
    try:
        sb = Sandbox.get(sandbox_id)
        sb.wait()
        sb.remove(force=True)
    except EmberError:
        pass


if __name__ == "__main__":
    main(sys.argv[1])
