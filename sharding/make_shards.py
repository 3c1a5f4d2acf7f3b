"""`python sharding/make_shards.py`: the sharding command (see `--help`; the job itself
lives in sharding/phoclip_sharding/). Installed as `phoclip-shards`."""
from phoclip_sharding.cli import console_main

if __name__ == "__main__":
    console_main()
