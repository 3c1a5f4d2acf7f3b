"""`python sharding/make_shards.py`: the sharding command (see `--help`; its main lives in
launch/phoclip_cli/shards.py, the job in sharding/phoclip_sharding/). Installed as
`phoclip-shards`."""
from phoclip_cli.shards import console_main, main  # noqa: F401 (main: the in-process entry)

if __name__ == "__main__":
    console_main()
