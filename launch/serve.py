"""The search service over an index: a JSON API and a Vietnamese search page.

    python launch/serve.py --index index/ [--model runs/exp1] --host 127.0.0.1 --port 8080
    open http://127.0.0.1:8080/

The command lives in phoclip_cli.serve (installed as `phoclip-serve`), the service in
phoclip.serve; --help lists every flag.
"""
import sys

from phoclip_cli.serve import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
