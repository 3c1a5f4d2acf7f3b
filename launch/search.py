"""Search an index: text → image, image → text, zero-shot tags.

    python launch/search.py --index index/ "xe hơi màu đỏ đậu trước ngôi nhà" --k 25 --html out.html
    python launch/search.py --index index/ --image photo.jpg --k 5
    python launch/search.py --index index/ --tags tags.txt --k 3

The command lives in phoclip_cli.search (installed as `phoclip-search`); --help lists every option.
"""
import sys

from phoclip_cli.search import main

if __name__ == "__main__":
    sys.exit(main())
