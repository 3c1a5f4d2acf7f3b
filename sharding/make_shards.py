"""`python sharding/make_shards.py`: the sharding command (see `--help`; the job itself
lives in sharding/phoclip_sharding/). Installed as `phoclip-shards`."""
from phoclip_sharding.cli import console_main, main  # noqa: F401 (main: the in-process entry)

if __name__ == "__main__":
    console_main()
