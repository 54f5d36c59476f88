"""``python -m ember.guest build [--force] | info``: the builder without the CLI.

The ``ember guest`` CLI commands wrap the same two calls; this entry point
lets setup scripts and CI build the assets before the CLI is wired up.
"""

from __future__ import annotations

import argparse
import json
import sys

from ember.config import load_config
from ember.errors import EmberError
from ember.guest.build import build_guest, guest_info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ember.guest")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or reuse) the guest kernel, initrd and rootfs")
    b.add_argument("--force", action="store_true", help="rebuild even if up to date")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    sub.add_parser("info", help="show the guest assets in use, as JSON")
    args = parser.parse_args(argv)
    try:
        cfg = load_config()
        if args.cmd == "build":
            assets = build_guest(cfg, progress=not args.quiet, force=args.force)
            print(f"guest assets {assets.key} ready in {assets.kernel.parent}")
        else:
            print(json.dumps(guest_info(cfg), indent=2))
    except EmberError as exc:
        print(f"ember: {exc.message}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
