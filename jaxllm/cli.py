"""The `jaxllm` console script: `jaxllm serve [MODEL] [flags]` (vLLM's `vllm serve`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jaxllm import __version__

USAGE = """usage: jaxllm serve [MODEL] [flags]
       jaxllm --version

Start the OpenAI-compatible server (the bundled stories260K model when MODEL is left out).
Run `jaxllm serve --help` for every flag."""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    if args[0] in ("-v", "--version"):
        print(__version__)
        return 0
    if args[0] != "serve":
        print(f"jaxllm: unknown command {args[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    from jaxllm.serve import main as serve_main  # noqa: PLC0415  (keeps `jaxllm --help` instant)

    return serve_main(args[1:], prog="jaxllm serve")


if __name__ == "__main__":
    sys.exit(main())
