"""The command-line programs: argument parsing and calls into the library (phoclip),
the sharding job (phoclip_sharding) and training (phoclip_train). The scripts in launch/
and the installed phoclip-* commands are thin wrappers around these `main(argv)`."""
